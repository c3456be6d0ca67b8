"""tokensparse.compile for Hugging Face generate(): pruned prefill, decoding from the pruned KV cache,
greedy tokens equal to the eager masking oracle's generate(), and the model passed in left unchanged."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, generate_without_warnings
from tests.models import build_llava
from tokensparse.reference.llava import masked_generate


def test_generate_equals_the_masking_oracle_and_leaves_the_model_alone():
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    forward = model.forward
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    out = generate_without_warnings(fast, **inputs, **settings, return_dict_in_generate=True)
    want = masked_generate(model, inputs, policy, **settings)
    assert torch.equal(out.sequences, want)
    # Layers 2 and 3 hold 3 + 4 + 5 prompt tokens and the generated ones (the last has no KV yet).
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [43, 43, 31, 31]
    assert model.forward == forward and fast.forward != forward
    # generate() must not compile the compiled forward again (it would on a GPU with a StaticCache)
    assert fast.generation_config.disable_compile and not model.generation_config.disable_compile


def test_every_prompt_length_is_pruned_including_the_dynamic_graph():
    """The second prompt length recompiles with a symbolic length s: the layers' reshapes read s (a SymInt
    node, not a literal) and must follow the kept tokens; FastV then prunes every prompt length."""
    model, _ = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    for prompt in ((3, 5), (4, 7), (6, 9)):
        _, inputs = build_llava(text_layers=4, image_tokens=16, prompt=prompt)
        out = generate_without_warnings(fast, **inputs, **settings, return_dict_in_generate=True)
        assert torch.equal(out.sequences, masked_generate(model, inputs, policy, **settings))
        full = sum(prompt) + 16 + 7
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [full, full, full - 12, full - 12]


def test_explicit_vision_span_holds_through_the_decode_steps():
    """vision_span= names the prompt's positions: the decode steps (one position each) carry no span and run
    from the pruned cache, equal to the oracle with the detected span."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    policy = tokensparse.FastV(layer=2, keep=0.25, vision_span=(3, 19))
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=6, **LOGGED)
    out = generate_without_warnings(fast, **inputs, **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, tokensparse.FastV(layer=2, keep=0.25), **settings))
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [29, 29, 17, 17]


PADDED_POLICIES = [tokensparse.FastV(layer=2, keep=0.25), tokensparse.FastV(layer=2, keep=0.5, query="text"),
                   tokensparse.PyramidDrop(layers=(1, 3), ratio=0.5), tokensparse.DivPrune(keep=0.3),
                   tokensparse.VisualExit(layer=2), tokensparse.VisionZip(dominant=4, contextual=2)]


def test_visionzip_generate_equals_the_masking_oracle():
    """VisionZip at the tower's second-to-last layer: 20 greedy tokens and every step's logits equal the
    oracle (which writes the contextual tokens into the projector's input and masks the dropped positions)."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    policy = tokensparse.VisionZip(dominant=6, contextual=2)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=20, **LOGGED)
    out = generate_without_warnings(fast, **inputs, **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **settings))
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [3 + 8 + 5 + 19] * 4


def _left_padded_llava():
    """Sample 0 holds 3 padding positions on the left, sample 1 none; 16 image tokens each."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(5, 5))
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    inputs["input_ids"][0, :3] = 0
    return model, inputs


@pytest.mark.parametrize("policy", PADDED_POLICIES, ids=lambda p: f"{p.name}_{getattr(p, 'query', '')}")
def test_a_left_padded_batch_is_pruned_per_sample(policy):
    """Padding positions are text, so every layer keeps them first; each decode step's mask is cut to the
    layer's own cache. Equal to the masking oracle, and the padded sample equals itself run alone."""
    model, inputs = _left_padded_llava()
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=10, **LOGGED)
    out = generate_without_warnings(fast, **inputs, **settings)
    alone = generate_without_warnings(fast, input_ids=inputs["input_ids"][:1, 3:],
                                      pixel_values=inputs["pixel_values"][:1], **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **settings))
    for got, single in zip(out.logits, alone.logits):
        torch.testing.assert_close(got[0], single[0], rtol=1e-4, atol=1e-5)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[-1] < lengths[0] or isinstance(policy, (tokensparse.DivPrune, tokensparse.VisionZip))
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_right_padding_is_refused_with_the_fix():
    model, inputs = _left_padded_llava()
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.FastV(layer=2, keep=0.25), inductor=False))
    with pytest.raises(ValueError, match=r"pads samples \[0\] on the right .* needs left padding"):
        fast.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("text_model", ["qwen2", "mistral"])
@pytest.mark.parametrize("policy", [tokensparse.FastV(layer=2, keep=0.25), tokensparse.PyramidDrop(layers=(1, 3), ratio=0.5)],
                         ids=lambda p: p.name)
def test_llava_with_other_text_models_equals_the_masking_oracle(text_model, policy):
    """LLaVA with a Qwen2 (q/k/v biases) or Mistral (sliding window longer than the prompt) text model."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(5, 5), text_model=text_model)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=20, **LOGGED)
    out = generate_without_warnings(fast, **inputs, **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **settings))
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[-1] == lengths[0] - 12           # both keep 4 of the 16 image tokens in the last layer


@pytest.mark.parametrize("policy", [tokensparse.FastV(layer=2, keep=0.5), tokensparse.DivPrune(keep=0.3)],
                         ids=lambda p: p.name)
def test_llava_onevision_anyres_image_equals_the_masking_oracle(policy):
    """LLaVA-OneVision picks an anyres tiling per image size in Python, which splits its tower into graphs:
    generate() runs the tower before the prefill, whose graph holds the merge and the language model."""
    from tests.models import build_llava_onevision

    model, inputs = build_llava_onevision()
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=8, **LOGGED)
    out = generate_without_warnings(fast, **inputs, **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **settings))
    images = int((inputs["input_ids"][0] == model.config.image_token_index).sum())      # 52, with newline tokens
    full = inputs["input_ids"].shape[1] + 7
    kept = [full - images + round(policy.keep * images)] * 2
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == (
        [full] * 2 + kept if isinstance(policy, tokensparse.FastV) else kept * 2)


@pytest.mark.parametrize("policy, lengths", [(tokensparse.FastV(layer=2, keep=0.5), [33, 33, 24, 24]),
                                             (tokensparse.DivPrune(keep=0.3), [21] * 4)], ids=lambda p: str(p)[:5])
def test_llava_onevision_video_equals_the_masking_oracle(policy, lengths):
    """A 4-frame video per sample (pooled frames and a newline token: 17 video tokens): the prefill graph merges
    the video features that generate() encodes first, and the policy prunes them like image tokens."""
    from tests.models import build_llava_onevision

    model, _ = build_llava_onevision()
    generator = torch.Generator().manual_seed(3)
    videos = torch.randn(2, 4, 3, 32, 32, generator=generator)
    vocab = model.config.text_config.vocab_size
    input_ids = torch.cat([torch.randint(0, vocab - 10, (2, 4), generator=generator),
                           torch.full((2, 17), model.config.video_token_index),
                           torch.randint(0, vocab - 10, (2, 5), generator=generator)], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": videos}
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    settings = dict(max_new_tokens=8, **LOGGED)
    out = generate_without_warnings(fast, **inputs, **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **settings))
    # 26 prompt tokens + 7 generated; FastV keeps 8 of 17 video tokens from layer 2, DivPrune 5 from layer 0
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == lengths
