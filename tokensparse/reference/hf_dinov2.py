"""Eager reference for transformers Dinov2Model: mirrors transformers/models/dinov2/modeling_dinov2.py
(Dinov2Model.forward, Dinov2Layer with layer scale, Dinov2Attention) with the layer loop and attention unrolled."""

from __future__ import annotations

import torch
from transformers import Dinov2Model

from tokensparse.reference._common import project_qkv, run_blocks


def supports(model) -> bool:
    """transformers Dinov2Model."""
    return isinstance(model, Dinov2Model)


def _qkv(layer, x):
    """Dinov2Attention.forward up to the attention interface: norm1, q/k/v_proj, split heads."""
    attn = layer.attention
    h = layer.norm1(x)
    return project_qkv(attn, h, attn.scaling)


def _attn_out(layer, o, x):
    """Dinov2Attention's o_proj, then Dinov2Layer's layer_scale1 and drop_path."""
    return layer.drop_path(layer.layer_scale1(layer.attention.o_proj(o)))


def _mlp(layer, x):
    """Dinov2Layer's MLP half: drop_path(layer_scale2(mlp(norm2(x)))) (MLP or SwiGLU FFN)."""
    return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """Dinov2Model.forward: embeddings, layer loop over encoder.layer, layernorm; pooler = CLS token."""
    x = model.embeddings(pixel_values)
    x = run_blocks(x, list(model.encoder.layer), policy, 1, _qkv, _attn_out, _mlp)
    last = model.layernorm(x)
    return {"last_hidden_state": last, "pooler_output": last[:, 0, :]}
