"""Eager reference for transformers CLIPVisionModel: mirrors transformers/models/clip/modeling_clip.py
(CLIPVisionModel.forward, CLIPEncoderLayer, CLIPAttention) with the layer loop and attention unrolled."""

from __future__ import annotations

import torch
from transformers import CLIPVisionModel

from tokensparse.reference._common import run_blocks, self_attn_mlp, self_attn_out, self_attn_qkv


def supports(model) -> bool:
    """transformers CLIPVisionModel."""
    return isinstance(model, CLIPVisionModel)


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """CLIPVisionModel.forward: embeddings, pre_layrnorm, layer loop; pooler = post_layernorm(CLS token)."""
    x = model.pre_layrnorm(model.embeddings(pixel_values))
    last = run_blocks(x, list(model.encoder.layers), policy, 1, self_attn_qkv, self_attn_out, self_attn_mlp)
    return {"last_hidden_state": last, "pooler_output": model.post_layernorm(last[:, 0, :])}
