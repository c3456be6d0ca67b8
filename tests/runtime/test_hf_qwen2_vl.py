"""tokensparse.compile on Qwen2-VL and Qwen2.5-VL: image and video prompts with 3-D M-RoPE positions, greedy
generate() equal to the eager masking oracle's for every language-model policy and DTD, padded batches, and
one run through Inductor."""

import pytest
import torch

import tokensparse
from tests import generation
from tests.models import build_qwen2_vl
from tokensparse import TokensparseWarning
from tokensparse.reference.llava import masked_forward, masked_generate
from tokensparse.runtime.hf_model import vision_token_mask

LOGGED = dict(max_new_tokens=8, **generation.LOGGED)
# Temporal patches 1 and 3 of the 4 repeat the one before: DTD drops their 2 x 16 tokens.
REPEATED = (1, 3)


def _generate(model, inputs, policy, inductor=False):
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=inductor))
    return generation.generate_without_warnings(fast, **inputs, **LOGGED)


def _assert_equals_oracle(model, inputs, policy, out):
    generation.assert_equals_oracle(out, masked_generate(model, inputs, policy, **LOGGED))


def _cache_lengths(out) -> list[int]:
    return [layer.keys.shape[2] for layer in out.past_key_values.layers]


@pytest.mark.parametrize("family,policy", [
    ("qwen2_vl", tokensparse.FastV(layer=2, keep=0.5)),
    ("qwen2_vl", tokensparse.PyramidDrop(layers=(1, 3), ratio=0.5)),
    ("qwen2_vl", tokensparse.DivPrune(keep=0.3)),
    ("qwen2_vl", tokensparse.VisualExit(layer=2)),
    ("qwen2_vl", tokensparse.DTD(tau=0.9)),
    ("qwen2_5_vl", tokensparse.FastV(layer=2, keep=0.5)),
    ("qwen2_5_vl", tokensparse.DTD(tau=0.9)),
], ids=lambda value: value if isinstance(value, str) else value.name)
def test_an_image_and_a_video_prompt_equals_the_masking_oracle(family, policy):
    model, inputs = build_qwen2_vl(family=family, image=(4, 4), repeated=REPEATED)
    out = _generate(model, inputs, policy)
    _assert_equals_oracle(model, inputs, policy, out)
    prompt = inputs["input_ids"].shape[1]                      # 5 + 4 image + 64 video + 6 + 4 markers = 83
    if isinstance(policy, tokensparse.DTD):
        assert _cache_lengths(out) == [prompt + 7 - 32] * 4
    if isinstance(policy, tokensparse.FastV):
        assert _cache_lengths(out) == [prompt + 7] * 2 + [prompt + 7 - 34] * 2     # half of the 68 vision tokens


def test_dtd_keeps_every_changed_patch_and_the_image():
    model, inputs = build_qwen2_vl(image=(4, 4), repeated=REPEATED)
    kept = masked_forward(model, inputs, tokensparse.DTD(tau=0.9))["kept"]
    vision = vision_token_mask(model.config, inputs["input_ids"])
    video = (inputs["input_ids"] == model.config.video_token_id).nonzero()[:, 1].view(2, 4, 16)
    dropped = torch.cat([video[:, 1], video[:, 3]], dim=1)
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    want = positions[~torch.zeros_like(vision).scatter(1, dropped, True)].view(2, -1)
    assert torch.equal(kept, want)


def test_a_left_padded_video_batch_through_inductor():
    model, inputs = build_qwen2_vl(repeated=REPEATED)
    ids = inputs["input_ids"]
    inputs["input_ids"] = torch.cat([torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids[:1]], dim=1),
                                     torch.cat([torch.tensor([[5, 6, 7]]), ids[1:]], dim=1)])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    inputs["mm_token_type_ids"] = torch.where(inputs["input_ids"] == model.config.video_token_id, 2, 0)
    policy = tokensparse.DTD(tau=0.9)
    out = _generate(model, inputs, policy, inductor=True)
    _assert_equals_oracle(model, inputs, policy, out)
    assert _cache_lengths(out) == [inputs["input_ids"].shape[1] + 7 - 32] * 4


def test_dtd_without_mrope_positions_warns_and_leaves_the_graph_unchanged():
    from tests.models import build_llava

    model, inputs = build_llava(text_layers=2, image_tokens=16)
    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.DTD(tau=0.9), inductor=False))
    with torch.no_grad(), pytest.warns(TokensparseWarning, match="3-D M-RoPE position ids"):
        out = fast.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    assert len(set(_cache_lengths(out))) == 1


def test_dtd_with_tau_one_equals_the_unmodified_model():
    """Nothing is more similar than identical: tau=1 drops nothing, and generate() is the model's own."""
    model, inputs = build_qwen2_vl(image=(4, 4), repeated=REPEATED)
    out = _generate(model, inputs, tokensparse.DTD(tau=1.0))
    with torch.no_grad():
        want = model.generate(**inputs, **LOGGED)
    assert torch.equal(out.sequences, want.sequences)
    assert all(torch.equal(got, expected) for got, expected in zip(out.logits, want.logits))
    assert _cache_lengths(out) == [inputs["input_ids"].shape[1] + 7] * 4
