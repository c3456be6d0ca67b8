"""Eager reference for transformers SiglipVisionModel (no CLS token, p=0): mirrors
transformers/models/siglip/modeling_siglip.py (SiglipVisionModel.forward, SiglipEncoderLayer, SiglipAttention)."""

from __future__ import annotations

import torch
from transformers import SiglipVisionModel

from tokensparse.reference._common import run_blocks, self_attn_mlp, self_attn_out, self_attn_qkv


def supports(model) -> bool:
    """transformers SiglipVisionModel."""
    return isinstance(model, SiglipVisionModel)


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """SiglipVisionModel.forward: embeddings, layer loop, post_layernorm, attention-pooling head (if any)."""
    x = model.embeddings(pixel_values)
    x = run_blocks(x, list(model.encoder.layers), policy, 0, self_attn_qkv, self_attn_out, self_attn_mlp)
    last = model.post_layernorm(x)
    pooled = model.head(last) if model.use_head else None
    return {"last_hidden_state": last, "pooler_output": pooled}
