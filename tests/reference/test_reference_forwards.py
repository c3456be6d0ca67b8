"""tokensparse.reference: the hand-written eager forwards equal the unmodified models without a policy, and apply
ToMe / TopK with the token counts that capped_r / kept_count give."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.models import HF_FAMILIES, PREFIX_TOKENS, TIMM_FAMILIES, VISION_FAMILIES, build
from tokensparse import ToMe, TopK
from tokensparse.policies.tome import capped_r
from tokensparse.policies.topk import kept_count
from tokensparse.reference import reference_forward

BATCHES = (1, 3)
DEPTH = 3
PATCHES = 64  # 32x32 images, patch 4


@functools.cache
def _built(name: str, batch: int):
    return build(name, depth=DEPTH, batch=batch)


def _model_outputs(name: str, model, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if name in TIMM_FAMILIES:
            return {"logits": model(x), "tokens": model.forward_features(x)}
        out = model(pixel_values=x)
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def _reference(model, x, policy=None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return reference_forward(model, x, policy)


def _token_count(name: str, out: dict[str, torch.Tensor]) -> int:
    return out["tokens" if name in TIMM_FAMILIES else "last_hidden_state"].shape[1]


def _expected_tokens(policy, tokens: int, prefix: int, depth: int = DEPTH) -> int:
    if isinstance(policy, ToMe):
        for r in policy.r_per_block(depth):
            tokens -= capped_r(r, tokens, prefix)
    else:
        for index in range(depth):
            if index in policy.layers:
                tokens = prefix + kept_count(tokens, prefix, policy.keep) + int(policy.fuse)
    return tokens


def _assert_finite(out: dict[str, torch.Tensor]) -> None:
    for key, value in out.items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_no_policy_equals_model(name, batch):
    model, x = _built(name, batch)
    expected = _model_outputs(name, model, x)
    out = _reference(model, x)
    assert out.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [ToMe(r=0), TopK(layers=(0,), keep=1.0)], ids=["tome_r0", "topk_keep1"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_identity_policies_equal_model(name, batch, policy):
    model, x = _built(name, batch)
    expected = _model_outputs(name, model, x)
    out = _reference(model, x, policy)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [ToMe(r=2), ToMe(r=40, schedule="decreasing"),
                                    TopK(layers=(0, 1), keep=0.5, fuse=True), TopK(layers=(2,), keep=0.3)],
                         ids=["tome_r2", "tome_r40_capped", "topk_fuse", "topk_last"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_policies_reduce_tokens(name, batch, policy):
    model, x = _built(name, batch)
    prefix = PREFIX_TOKENS[name]
    out = _reference(model, x, policy)
    expected = _expected_tokens(policy, prefix + PATCHES, prefix)
    assert expected < prefix + PATCHES
    assert _token_count(name, out) == expected
    _assert_finite(out)
    reference_shapes = {key: value.shape for key, value in _model_outputs(name, model, x).items()}
    for key, value in out.items():  # only the token axis of the sequence output changes
        if key in ("tokens", "last_hidden_state"):
            assert value.shape == (batch, expected, reference_shapes[key][-1])
        else:
            assert value.shape == reference_shapes[key]


@pytest.mark.parametrize("name", ["timm_vit_reg4", "hf_siglip"])
def test_explicit_prefix_tokens_equal_model_count(name):
    """policy.prefix_tokens=None means the model's own count (CLS, distillation, registers)."""
    model, x = _built(name, 3)
    prefix = PREFIX_TOKENS[name]
    for explicit, default in ((ToMe(r=2, prefix_tokens=prefix), ToMe(r=2)),
                              (TopK(layers=(0, 1), keep=0.5, prefix_tokens=prefix), TopK(layers=(0, 1), keep=0.5))):
        torch.testing.assert_close(_reference(model, x, explicit), _reference(model, x, default), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["timm_vit", "hf_clip"])
def test_prefix_tokens_override_changes_counts(name):
    model, x = _built(name, 1)
    out = _reference(model, x, ToMe(r=40, prefix_tokens=0))
    assert _token_count(name, out) == _expected_tokens(ToMe(r=40), 1 + PATCHES, 0)
    with pytest.raises(ValueError, match="prefix_tokens"):
        _reference(model, x, ToMe(r=2, prefix_tokens=1 + PATCHES))


@pytest.mark.parametrize("name", ["timm_deit_distilled", "hf_dinov2"])
def test_proportional_attention_matters_after_first_merge(name):
    model, x = _built(name, 3)
    with_bias = _reference(model, x, ToMe(r=2))
    without = _reference(model, x, ToMe(r=2, proportional_attention=False))
    key = "tokens" if name in TIMM_FAMILIES else "last_hidden_state"
    assert with_bias[key].shape == without[key].shape
    assert not torch.allclose(with_bias[key], without[key])
    # Merging only in the last block: no later attention sees sizes, so the bias changes nothing.
    last_only = (0,) * (DEPTH - 1) + (2,)
    torch.testing.assert_close(_reference(model, x, ToMe(r=last_only)),
                               _reference(model, x, ToMe(r=last_only, proportional_attention=False)))


def test_unsupported_models_and_policies_raise():
    with pytest.raises(TypeError, match="does not support"):
        reference_forward(torch.nn.Linear(4, 4), torch.zeros(1, 4))
    from timm.models.vision_transformer import ResPostBlock

    model, x = build("timm_vit", depth=2, batch=1, block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="ResPostBlock"):
        reference_forward(model, x)
    model, x = _built("hf_vit", 1)
    with pytest.raises(TypeError, match="ToMe and TopK"):
        reference_forward(model, x, policy=object())
    with pytest.raises(ValueError, match="past the model's depth"):
        reference_forward(model, x, TopK(layers=(DEPTH,)))


@pytest.mark.parametrize("name", HF_FAMILIES + ["timm_vit"])
def test_build_is_deterministic_and_configurable(name):
    model_a, x_a = build(name, depth=2, width=48, heads=4, batch=2)
    model_b, x_b = build(name, depth=2, width=48, heads=4, batch=2)
    torch.testing.assert_close(x_a, x_b, atol=0, rtol=0)
    for (key, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)
    assert x_a.shape == (2, 3, 32, 32)
    out = _reference(model_a, x_a, ToMe(r=3))
    assert _token_count(name, out) == _expected_tokens(ToMe(r=3), PREFIX_TOKENS[name] + PATCHES,
                                                       PREFIX_TOKENS[name], depth=2)


def _timm_weights_into_hf_vit(timm_model, hf_model) -> None:
    """Copy a timm ViT's weights into a same-shaped transformers ViTModel (qkv split into q/k/v_proj)."""
    state = {"embeddings.cls_token": timm_model.cls_token, "embeddings.position_embeddings": timm_model.pos_embed,
             "embeddings.patch_embeddings.projection.weight": timm_model.patch_embed.proj.weight,
             "embeddings.patch_embeddings.projection.bias": timm_model.patch_embed.proj.bias,
             "layernorm.weight": timm_model.norm.weight, "layernorm.bias": timm_model.norm.bias}
    for i, block in enumerate(timm_model.blocks):
        ours = f"layers.{i}."
        for kind, weight, bias in zip(("q", "k", "v"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)):
            state[ours + f"attention.{kind}_proj.weight"], state[ours + f"attention.{kind}_proj.bias"] = weight, bias
        pairs = {"attention.o_proj": block.attn.proj, "layernorm_before": block.norm1,
                 "layernorm_after": block.norm2, "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}
        for name, module in pairs.items():
            state[ours + name + ".weight"], state[ours + name + ".bias"] = module.weight, module.bias
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("pooler.") for key in missing), (missing, unexpected)


@pytest.mark.parametrize("policy", [None, ToMe(r=5), TopK(layers=(0, 2), keep=0.6, fuse=True)],
                         ids=["none", "tome", "topk"])
def test_timm_and_hf_vit_agree_with_the_same_weights(policy):
    """Two independently written families (timm qkv-fused, HF split q/k/v) give the same reduced tokens."""
    timm_model, x = _built("timm_vit", 3)
    hf_model, _ = build("hf_vit", depth=DEPTH, layer_norm_eps=1e-6)
    _timm_weights_into_hf_vit(timm_model, hf_model)
    timm_out, hf_out = _reference(timm_model, x, policy), _reference(hf_model, x, policy)
    torch.testing.assert_close(hf_out["last_hidden_state"], timm_out["tokens"], atol=1e-5, rtol=1e-5)
