"""Eager reference for timm VisionTransformer (incl. VisionTransformerDistilled and register tokens): mirrors
timm.models.vision_transformer.VisionTransformer.forward with Block / layers.attention.Attention unrolled."""

from __future__ import annotations

import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from tokensparse.reference._common import run_blocks


def supports(model) -> bool:
    """timm VisionTransformer (or a subclass such as VisionTransformerDistilled)."""
    return isinstance(model, VisionTransformer)


def _qkv(block, x):
    """timm Attention.forward up to SDPA: norm1, qkv linear, reshape/permute/unbind, q_norm/k_norm."""
    attn = block.attn
    h = block.norm1(x)
    B, N, _ = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, attn.scale


def _attn_out(block, o, x):
    """timm Attention.forward after SDPA (norm, gate, proj, proj_drop), then Block's ls1 and drop_path1."""
    attn = block.attn
    o = attn.norm(o)
    if attn.gate is not None:
        o = o * attn.gate(block.norm1(x)).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    return block.drop_path1(block.ls1(o))


def _mlp(block, x):
    """timm Block's MLP half: drop_path2(ls2(mlp(norm2(x))))."""
    return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """VisionTransformer.forward_features with a hand-written block loop, then model.forward_head."""
    for index, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"reference_forward supports timm Block/Attention blocks only; block {index} is "
                            f"{type(block).__name__} with {type(block.attn).__name__}")
    x = model.patch_embed(pixel_values)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = run_blocks(x, list(model.blocks), policy, model.num_prefix_tokens, _qkv, _attn_out, _mlp)
    tokens = model.norm(x)
    return {"logits": model.forward_head(tokens), "tokens": tokens}
