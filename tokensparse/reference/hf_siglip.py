"""Eager reference for transformers SiglipVisionModel (no CLS token, p=0): mirrors
transformers/models/siglip/modeling_siglip.py (SiglipVisionModel.forward, SiglipEncoderLayer, SiglipAttention)."""

from __future__ import annotations

import torch
from transformers import SiglipVisionModel

from tokensparse.reference._common import run_blocks, split_heads


def supports(model) -> bool:
    """transformers SiglipVisionModel."""
    return isinstance(model, SiglipVisionModel)


def _qkv(layer, x):
    """SiglipAttention.forward up to the attention interface: layer_norm1, q/k/v_proj, split heads."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    return (split_heads(attn.q_proj(h), attn.head_dim), split_heads(attn.k_proj(h), attn.head_dim),
            split_heads(attn.v_proj(h), attn.head_dim), attn.scale)


def _attn_out(layer, o, x):
    """SiglipAttention's out_proj."""
    return layer.self_attn.out_proj(o)


def _mlp(layer, x):
    """SiglipEncoderLayer's MLP half: mlp(layer_norm2(x))."""
    return layer.mlp(layer.layer_norm2(x))


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """SiglipVisionModel.forward: embeddings, layer loop, post_layernorm, attention-pooling head (if any)."""
    x = model.embeddings(pixel_values)
    x = run_blocks(x, list(model.encoder.layers), policy, 0, _qkv, _attn_out, _mlp)
    last = model.post_layernorm(x)
    pooled = model.head(last) if model.use_head else None
    return {"last_hidden_state": last, "pooler_output": pooled}
