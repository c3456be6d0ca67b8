"""The language-model pass on a LLaVA graph (CLIP tower, Llama GQA text model), run eagerly: every policy
equals the eager masking oracle (tokensparse/reference/llava.py) at the kept positions, the KV cache holds
the pruned tokens from the stage's layer on, and keep=1.0 leaves the model exactly as it was."""

import warnings

import pytest
import torch

import tokensparse
from tests.models import build_llava
from tokensparse import TokensparseWarning
from tokensparse.reference.llava import masked_forward
from tokensparse.runtime.hf_model import install_output_hooks

POLICIES = [
    (tokensparse.FastV(layer=2, keep=0.25), [24, 24, 12, 12, 12, 12]),
    (tokensparse.FastV(layer=3, keep=0.5, query="text"), [24, 24, 24, 16, 16, 16]),
    (tokensparse.PyramidDrop(layers=(2, 4), ratio=0.5), [24, 24, 16, 16, 12, 12]),
    (tokensparse.DivPrune(keep=0.3), [13] * 6),
    (tokensparse.VisualExit(layer=3), [24, 24, 24, 8, 8, 8]),
]


def _llava(**kwargs):
    model, inputs = build_llava(**{"text_layers": 6, "image_tokens": 16, "prompt": (3, 5), **kwargs})
    install_output_hooks(model)
    return model, inputs


@pytest.fixture(scope="module")
def llava():
    return _llava()


def run_pruned(model, inputs, policy, **options):
    compiled = torch.compile(model, backend="tokensparse", options={"policy": policy, "inductor": False, **options})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        return compiled(**inputs)


def assert_equals_oracle(out, want):
    kept = want["kept"]
    rows = want["logits"].gather(1, kept[..., None].expand(-1, -1, want["logits"].shape[-1]))
    assert out.logits.shape == rows.shape
    torch.testing.assert_close(out.logits, rows, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy, cache", POLICIES, ids=lambda p: getattr(p, "name", None))
def test_policy_equals_the_masking_oracle(llava, policy, cache):
    model, inputs = llava
    out = run_pruned(model, inputs, policy)
    assert_equals_oracle(out, masked_forward(model, inputs, policy))
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == cache


@pytest.mark.parametrize("batch", [1, 3])
def test_fastv_at_other_batch_sizes(batch):
    model, inputs = _llava(batch=batch, text_layers=4, seed=batch)
    policy = tokensparse.FastV(layer=1, keep=0.5)
    assert_equals_oracle(run_pruned(model, inputs, policy), masked_forward(model, inputs, policy))


@pytest.mark.parametrize("policy", [tokensparse.FastV(layer=2, keep=1.0), tokensparse.PyramidDrop(layers=(2, 4), ratio=1.0),
                                    tokensparse.DivPrune(keep=1.0)], ids=lambda p: p.name)
def test_keep_all_is_the_unmodified_model(llava, policy):
    model, inputs = llava
    with torch.no_grad():
        want = model(**inputs).logits
    assert torch.equal(run_pruned(model, inputs, policy).logits, want)


def test_explicit_vision_span_equals_the_detected_one(llava):
    model, inputs = llava
    detected = run_pruned(model, inputs, tokensparse.FastV(layer=2, keep=0.25))
    explicit = run_pruned(model, inputs, tokensparse.FastV(layer=2, keep=0.25, vision_span=(3, 19)))
    torch.testing.assert_close(explicit.logits, detected.logits)


def test_text_only_prompt_runs_unpruned_without_a_warning(llava):
    model, inputs = llava
    text = {"input_ids": inputs["input_ids"][:, 19:]}
    with torch.no_grad():
        want = model(**text).logits
    torch.testing.assert_close(run_pruned(model, text, tokensparse.FastV(layer=2, keep=0.25)).logits, want)


def test_a_layer_past_the_depth_is_refused(llava):
    model, inputs = llava
    with pytest.raises(Exception, match=r"layer 6 is out of range: fastv needs 1 <= layer < 6"):
        run_pruned(model, inputs, tokensparse.FastV(layer=6, keep=0.5))


def test_a_vision_span_outside_the_sequence_is_refused(llava):
    model, inputs = llava
    with pytest.raises(Exception, match=r"vision_span=\(3, 30\) is outside the sequence: the prompt has 24"):
        run_pruned(model, inputs, tokensparse.FastV(layer=2, keep=0.5, vision_span=(3, 30)))


def assert_refused_unchanged(model, inputs, layer, reason):
    """One TokensparseWarning naming `reason`, and outputs equal to the unmodified model's."""
    compiled = torch.compile(model, backend="tokensparse",
                             options={"policy": "fastv", "layer": layer, "keep": 0.5, "inductor": False})
    with torch.no_grad():
        with pytest.warns(TokensparseWarning, match=reason):
            got = compiled(**inputs).logits
        want = model(**inputs).logits
    torch.testing.assert_close(got, want)


def test_hidden_size_equal_to_the_sequence_length_refuses_with_the_reason():
    """64 positions and hidden size 64: which axis of the residual stream holds the tokens is ambiguous."""
    model, inputs = _llava(prompt=(24, 24), text_layers=3)
    assert_refused_unchanged(model, inputs, 1, "cannot tell which axis holds the 64 tokens")


def test_padding_is_refused_with_the_reason(llava):
    model, inputs = llava
    padded = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
    padded["attention_mask"][0, :2] = 0
    assert_refused_unchanged(model, padded, 2, "padding attention mask: pruning padded prompts in a graph that "
                                                "returns the KV cache needs tokensparse.compile")


# VisionZip acts at the vision tower's feature layer; the tower has 3 layers so that -2 is not the last one.
def _zip_llava(feature_layer=-2, strategy="default", **kwargs):
    return _llava(**{"vision_layers": 3, "text_layers": 4, "feature_layer": feature_layer,
                     "feature_strategy": strategy, **kwargs})


@pytest.mark.parametrize("feature_layer, strategy, batch", [(-2, "default", 2), (-1, "full", 3), (-2, "full", 1)])
def test_visionzip_equals_the_masking_oracle(feature_layer, strategy, batch):
    """5 dominant (CLS among them when the features hold it) + 2 contextual of 16 patches: 8 text + 7 image."""
    model, inputs = _zip_llava(feature_layer, strategy, batch=batch, seed=batch)
    policy = tokensparse.VisionZip(dominant=5, contextual=2)
    want = masked_forward(model, inputs, policy)
    out = run_pruned(model, inputs, policy)
    assert_equals_oracle(out, want)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [15] * 4
    if strategy == "full":        # the CLS feature (the first image position) is always kept
        assert bool((want["kept"] == 3).any(dim=1).all())


def test_visionzip_keeping_every_patch_is_the_unmodified_model():
    model, inputs = _zip_llava()
    with torch.no_grad():
        want = model(**inputs).logits
    assert torch.equal(run_pruned(model, inputs, tokensparse.VisionZip(dominant=16, contextual=0)).logits, want)


def test_visionzip_counts_that_do_not_fit_the_encoder_are_refused():
    model, inputs = _zip_llava()
    with pytest.raises(Exception, match=r"dominant=15, contextual=2 do not fit the encoder's 16 patch tokens"):
        run_pruned(model, inputs, tokensparse.VisionZip(dominant=15, contextual=2))


def test_visionzip_on_features_from_two_encoder_layers_refuses_with_the_reason():
    model, inputs = _zip_llava()
    model.config.vision_feature_layer = [-2, -1]
    model.model.config.vision_feature_layer = [-2, -1]
    model.model.multi_modal_projector.linear_1 = torch.nn.Linear(64, 64)
    compiled = torch.compile(model, backend="tokensparse", options={"policy": "visionzip", "dominant": 4,
                                                                      "inductor": False})
    with torch.no_grad():
        with pytest.warns(TokensparseWarning, match="the image features come from 2 vision-encoder tensors"):
            got = compiled(**inputs).logits
        want = model(**inputs).logits
    torch.testing.assert_close(got, want)
