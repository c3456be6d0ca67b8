"""Eager reference for transformers ViTModel: mirrors transformers/models/vit/modeling_vit.py (ViTModel.forward,
ViTLayer, ViTAttention) with the layer loop and attention unrolled."""

from __future__ import annotations

import torch
from transformers import ViTModel

from tokensparse.reference._common import project_qkv, run_blocks


def supports(model) -> bool:
    """transformers ViTModel."""
    return isinstance(model, ViTModel)


def _qkv(layer, x):
    """ViTAttention.forward up to the attention interface: layernorm_before, q/k/v_proj, split heads."""
    attn = layer.attention
    h = layer.layernorm_before(x)
    return project_qkv(attn, h, attn.scaling)


def _attn_out(layer, o, x):
    """ViTAttention's o_proj, then ViTLayer's dropout before the residual add."""
    return layer.dropout(layer.attention.o_proj(o))


def _mlp(layer, x):
    """ViTLayer's MLP half: dropout(mlp(layernorm_after(x)))."""
    return layer.dropout(layer.mlp(layer.layernorm_after(x)))


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """ViTModel.forward: embeddings, hand-written layer loop, layernorm, pooler (CLS token)."""
    pixel_values = pixel_values.to(model.embeddings.patch_embeddings.projection.weight.dtype)
    x = model.embeddings(pixel_values)
    x = run_blocks(x, list(model.layers), policy, 1, _qkv, _attn_out, _mlp)
    last = model.layernorm(x)
    pooled = model.pooler(last) if model.pooler is not None else None
    return {"last_hidden_state": last, "pooler_output": pooled}
