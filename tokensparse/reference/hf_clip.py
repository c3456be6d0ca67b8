"""Eager reference for transformers CLIPVisionModel: mirrors transformers/models/clip/modeling_clip.py
(CLIPVisionModel.forward, CLIPEncoderLayer, CLIPAttention) with the layer loop and attention unrolled."""

from __future__ import annotations

import torch
from transformers import CLIPVisionModel

from tokensparse.reference._common import run_blocks, split_heads


def supports(model) -> bool:
    """transformers CLIPVisionModel."""
    return isinstance(model, CLIPVisionModel)


def _qkv(layer, x):
    """CLIPAttention.forward up to the attention interface: layer_norm1, q/k/v_proj, split heads."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    return (split_heads(attn.q_proj(h), attn.head_dim), split_heads(attn.k_proj(h), attn.head_dim),
            split_heads(attn.v_proj(h), attn.head_dim), attn.scale)


def _attn_out(layer, o, x):
    """CLIPAttention's out_proj."""
    return layer.self_attn.out_proj(o)


def _mlp(layer, x):
    """CLIPEncoderLayer's MLP half: mlp(layer_norm2(x))."""
    return layer.mlp(layer.layer_norm2(x))


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """CLIPVisionModel.forward: embeddings, pre_layrnorm, layer loop; pooler = post_layernorm(CLS token)."""
    x = model.pre_layrnorm(model.embeddings(pixel_values))
    last = run_blocks(x, list(model.encoder.layers), policy, 1, _qkv, _attn_out, _mlp)
    return {"last_hidden_state": last, "pooler_output": model.post_layernorm(last[:, 0, :])}
