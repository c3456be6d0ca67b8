"""The rewritten dynamo graph (run eagerly) against the independent eager reference, on every model
family, several sizes, batch sizes 1-4, and each policy; identity options equal the unmodified model."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import main_outputs, run_eager_backend
from tests.models import VISION_FAMILIES, build
from tokensparse import ToMe, TokensparseWarning, TopK
from tokensparse.reference import reference_forward

# (depth, width, heads, batch) per family, so that depths, widths, head counts and batches all vary.
SHAPES = [(3, 32, 2, 1), (4, 48, 3, 3), (3, 64, 4, 4), (5, 32, 4, 2)]
POLICIES = {
    "tome_r3": ToMe(r=3),
    "tome_decreasing_no_prop": ToMe(r=4, schedule="decreasing", proportional_attention=False),
    "topk_one_layer": TopK(layers=(1,), keep=0.5),
    "topk_fuse_two_layers": TopK(layers=(0, 2), keep=0.6, fuse=True),
}


def _options(policy) -> dict:
    return {key: value for key, value in policy.options().items() if value is not None}


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_rewrite_matches_reference(family, policy_name):
    index = (VISION_FAMILIES.index(family) + list(POLICIES).index(policy_name)) % len(SHAPES)
    depth, width, heads, batch = SHAPES[index]
    model, pixels = build(family, depth=depth, width=width, heads=heads, batch=batch)
    policy = POLICIES[policy_name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        got = main_outputs(run_eager_backend(model, pixels, _options(policy)))
    want = reference_forward(model, pixels, policy)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], atol=2e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("policy", [ToMe(r=0), TopK(layers=(0, 1), keep=1.0)], ids=["tome_r0", "topk_keep1"])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_nothing_to_prune_equals_unmodified_model(family, policy):
    model, pixels = build(family, batch=2)
    with torch.no_grad():
        want = main_outputs(model(pixels))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        got = main_outputs(run_eager_backend(model, pixels, _options(policy)))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_configs_match_reference(data):
    """Random timm configs (depth, width, heads, register tokens, batch) and random policy options."""
    depth = data.draw(st.integers(1, 4), label="depth")
    heads = data.draw(st.sampled_from([1, 2, 4]), label="heads")
    width = heads * data.draw(st.sampled_from([8, 16]), label="head_dim")
    registers = data.draw(st.integers(0, 3), label="reg_tokens")
    batch = data.draw(st.integers(1, 4), label="batch")
    patch = data.draw(st.sampled_from([4, 8]), label="patch")
    if data.draw(st.booleans(), label="tome"):
        policy = ToMe(r=data.draw(st.integers(0, 40), label="r"),
                      schedule=data.draw(st.sampled_from(["constant", "decreasing"]), label="schedule"),
                      proportional_attention=data.draw(st.booleans(), label="proportional"))
    else:
        layers = data.draw(st.sets(st.integers(0, depth - 1), min_size=1), label="layers")
        policy = TopK(layers=tuple(layers), keep=data.draw(st.floats(0.05, 1.0), label="keep"),
                      fuse=data.draw(st.booleans(), label="fuse"))
    torch._dynamo.reset()
    model, pixels = build("timm_vit", depth=depth, width=width, heads=heads, batch=batch, patch=patch,
                          reg_tokens=registers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        got = run_eager_backend(model, pixels, _options(policy))
    want = reference_forward(model, pixels, policy)["logits"]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", [ToMe(r=3), TopK(layers=(1,), keep=0.5, fuse=True)], ids=["tome", "topk"])
@pytest.mark.parametrize("family", ["timm_vit", "hf_vit"])
def test_unfused_attention_matches_reference(family, policy):
    """matmul-softmax-matmul attention: ToMe's size bias goes before the softmax; TopK reads q and k."""
    if family == "timm_vit":
        model, pixels = build(family, depth=3, batch=2)
        for block in model.blocks:
            block.attn.fused_attn = False
    else:
        model, pixels = build(family, depth=3, batch=2, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        got = main_outputs(run_eager_backend(model, pixels, _options(policy)))
    want = reference_forward(model, pixels, policy)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], atol=2e-5, rtol=1e-4)


def test_a_bug_inside_a_pass_compiles_unchanged_with_a_warning(monkeypatch):
    """An unexpected exception in a pass (a tokensparse bug) must not break the user's program: the graph
    compiles unchanged and the warning names the error. The tests themselves run with TOKENSPARSE_STRICT=1."""
    import tokensparse.fx.rewrite as rewrite

    def broken_pass(gm, ctx):
        raise RuntimeError("boom in a pass")

    monkeypatch.setattr(rewrite, "PASSES", (broken_pass,) + rewrite.PASSES)
    monkeypatch.setenv("TOKENSPARSE_STRICT", "0")
    model, pixels = build(VISION_FAMILIES[0], batch=2)
    with torch.no_grad():
        want = main_outputs(model(pixels))
    with pytest.warns(TokensparseWarning, match="internal error while rewriting \\(RuntimeError: boom in a pass\\)"):
        got = main_outputs(run_eager_backend(model, pixels, {"policy": ToMe(r=2)}))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    monkeypatch.setenv("TOKENSPARSE_STRICT", "1")
    with pytest.raises(Exception, match="boom in a pass"):
        torch._dynamo.reset()
        run_eager_backend(model, pixels, {"policy": ToMe(r=2)})
