"""positions="compact": from each cut on, the kept tokens take consecutive RoPE positions (as if the dropped
ones had never been in the prompt) and decode steps continue from there. Tested against the masking oracle,
which rebuilds each layer's RoPE tables from the tokens' ranks among the survivors, and, independently of
it, against the unmodified model run on the prompt with the dropped tokens removed."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, generate_without_warnings
from tests.models import build_llava, build_qwen2_vl
from tokensparse import TokensparseWarning
from tokensparse.reference.llava import masked_forward, masked_generate

SETTINGS = dict(max_new_tokens=20, **LOGGED)
TOWER = dict(vision_layers=3, feature_layer=-2)          # VisionZip reads the second-to-last tower layer

POLICIES = [
    (tokensparse.FastV(layer=2, keep=0.25, positions="compact"), {}),
    (tokensparse.FastV(layer=2, keep=0.5, query="text", positions="compact"), {}),
    (tokensparse.PyramidDrop(layers=(1, 3), ratio=0.5, positions="compact"), {}),
    (tokensparse.DivPrune(keep=0.3, positions="compact"), {}),
    (tokensparse.VisualExit(layer=2, positions="compact"), {}),
    (tokensparse.VisionZip(dominant=6, contextual=2, positions="compact"), TOWER),
]


def _original(policy):
    """The same policy with its kept tokens at their original positions."""
    return type(policy)(**{name: value for name, value in vars(policy).items() if name != "positions"})


def _compile(model, policy):
    return tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))


@pytest.mark.parametrize("policy, sizes", POLICIES,
                         ids=["fastv", "fastv_text", "pyramiddrop", "divprune", "exit", "visionzip"])
def test_generate_equals_the_compact_oracle(policy, sizes):
    """20 greedy tokens and every step's logits equal the oracle, and differ from original positions'."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), **sizes)
    out = generate_without_warnings(_compile(model, policy), **inputs, **SETTINGS)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **SETTINGS))
    original = masked_generate(model, inputs, _original(policy), **SETTINGS)
    assert max(float((got - other).abs().max()) for got, other in zip(out.logits, original.logits)) > 1e-4


def test_pruning_before_layer_0_is_the_model_on_the_shortened_prompt():
    """Independent of the oracle: DivPrune with compact positions keeps tokens before layer 0, so the
    language model must compute what it computes on the prompt without the dropped tokens (positions 0..S'-1),
    and greedy decoding must continue the same."""
    policy = tokensparse.DivPrune(keep=0.3, positions="compact")
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    kept = masked_forward(model, inputs, policy)["kept"]
    captured = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = model.model.language_model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embeds = captured[0]                        # the prompt with the image features merged
    shortened = embeds.gather(1, kept[..., None].expand(-1, -1, embeds.shape[-1]))
    out = generate_without_warnings(_compile(model, policy), **inputs, **SETTINGS)
    with torch.no_grad():
        want = model.generate(inputs_embeds=shortened, **SETTINGS)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], want.sequences)
    for got, expected in zip(out.logits, want.logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", [tokensparse.FastV(layer=2, keep=0.25, positions="compact"),
                                    tokensparse.PyramidDrop(layers=(1, 3), ratio=0.5, positions="compact")],
                         ids=lambda p: p.name)
def test_a_left_padded_batch(policy):
    """Sample 0 has 3 padding positions: equal to the oracle, and the padded sample equals itself alone."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(5, 5))
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    inputs["input_ids"][0, :3] = 0
    fast = _compile(model, policy)
    settings = dict(SETTINGS, max_new_tokens=10)
    out = generate_without_warnings(fast, **inputs, **settings)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **settings))
    alone = generate_without_warnings(fast, input_ids=inputs["input_ids"][:1, 3:],
                                      pixel_values=inputs["pixel_values"][:1], **settings)
    for got, single in zip(out.logits, alone.logits):
        torch.testing.assert_close(got[0], single[0], rtol=1e-4, atol=1e-5)


def test_keep_all_is_the_unmodified_model():
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    out = generate_without_warnings(_compile(model, tokensparse.FastV(layer=2, keep=1.0, positions="compact")),
                                    **inputs, **SETTINGS)
    with torch.no_grad():
        want = model.generate(**inputs, **SETTINGS)
    assert torch.equal(out.sequences, want.sequences)
    assert all(torch.equal(got, expected) for got, expected in zip(out.logits, want.logits))


def test_mrope_positions_warn_and_leave_the_graph_unchanged():
    """Qwen2-VL's 3-D M-RoPE ids have no compact form: one warning with the reason, the unpruned model."""
    model, inputs = build_qwen2_vl(image=(4, 4))
    fast = _compile(model, tokensparse.FastV(layer=2, keep=0.5, positions="compact"))
    settings = dict(SETTINGS, max_new_tokens=4)
    with torch.no_grad(), pytest.warns(TokensparseWarning, match="3-D M-RoPE position ids"):
        out = fast.generate(**inputs, **settings)
    with torch.no_grad():
        want = model.generate(**inputs, **settings)
    assert torch.equal(out.sequences, want.sequences)
    assert len({layer.keys.shape[2] for layer in out.past_key_values.layers}) == 1


def test_an_unknown_positions_value_is_refused():
    with pytest.raises(ValueError, match=r"positions='packed' is unknown: choose one of \['original', 'compact'\]"):
        tokensparse.FastV(positions="packed")
    with pytest.raises(ValueError, match="option 'positions' is unknown for policy 'dtd'"):
        tokensparse.config_from_options({"policy": "dtd", "positions": "compact"})
