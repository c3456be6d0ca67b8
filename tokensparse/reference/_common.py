"""Shared eager pieces of the reference path: SDPA attention and the policy step after each block's
attention residual, as the merge, proportional-attention and prune passes splice them into graphs."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from tokensparse.pipeline import check_prefix_override
from tokensparse.policies.tome import size_bias

# qkv(block, x) -> (q, k, v, scale): the block's SDPA inputs [B, H, N, d] from the stream x.
QKV = Callable[[torch.nn.Module, torch.Tensor], tuple]
# attn_out(block, o, x) -> the attention branch added to x; o is SDPA's output with heads merged [B, N, H*d].
AttnOut = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# mlp(block, x) -> the MLP branch added to x.
MLP = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


class PolicyState:
    """Per-forward state of a vision-encoder policy: its declared tower steps (policy.tower_step) run eagerly,
    as fx/passes/reduce_tokens.py and fx/passes/proportional_attention.py splice them into graphs."""

    def __init__(self, policy, depth: int, tokens: int, model_prefix_tokens: int):
        if policy is not None and getattr(policy, "stage", None) != "vision":
            raise TypeError(f"reference_forward supports the vision-encoder policies (ToMe and TopK), not "
                            f"{type(policy).__name__}")
        self.policy = policy
        self.depth = depth
        prefix = getattr(policy, "prefix_tokens", None)
        self.prefix_tokens = model_prefix_tokens if prefix is None else prefix
        if self.prefix_tokens >= tokens:
            raise ValueError(f"prefix_tokens={self.prefix_tokens} is out of range: the model has {tokens} tokens "
                             "in its first block")
        check_prefix_override(self.prefix_tokens, model_prefix_tokens, tokens)
        self.size: Optional[torch.Tensor] = None
        if policy is not None:
            policy.check_depth(depth)

    def attn_mask(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """ToMe proportional attention: + log(size) on the keys once any block has merged."""
        if self.policy is not None and self.policy.sizes_bias_attention and self.size is not None:
            return size_bias(self.size).to(dtype)
        return None

    def step(self, index: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Reduce the stream right after block `index`'s attention residual add, before its MLP."""
        if self.policy is None:
            return x
        step = self.policy.tower_step(index, self.depth, x.shape[1], self.prefix_tokens)
        if step is None:
            return x
        if step.sized and self.size is None:
            self.size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
        values = {"x": x, "size": self.size, "query": q, "keys": k, "scale": scale, "mask": None}
        out = step.function(*step.arguments(values))
        if step.sized:
            x, self.size = out
            return x
        return out


def attention(q, k, v, scale: float, attn_mask=None) -> torch.Tensor:
    """F.scaled_dot_product_attention, heads merged back: [B, H, N, d] -> [B, N, H*d]."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d], as HF attention modules do with view(...).transpose(1, 2)."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def project_qkv(attn: torch.nn.Module, hidden: torch.Tensor, scale: float):
    """HF attention modules' q_proj/k_proj/v_proj with heads split: (q, k, v, scale)."""
    return (split_heads(attn.q_proj(hidden), attn.head_dim), split_heads(attn.k_proj(hidden), attn.head_dim),
            split_heads(attn.v_proj(hidden), attn.head_dim), scale)


def self_attn_qkv(layer, x):
    """CLIP/SigLIP encoder layers: layer_norm1, then self_attn's projections."""
    return project_qkv(layer.self_attn, layer.layer_norm1(x), layer.self_attn.scale)


def self_attn_out(layer, o, x):
    """CLIP/SigLIP encoder layers: self_attn.out_proj."""
    return layer.self_attn.out_proj(o)


def self_attn_mlp(layer, x):
    """CLIP/SigLIP encoder layers' MLP half: mlp(layer_norm2(x))."""
    return layer.mlp(layer.layer_norm2(x))


def run_blocks(x: torch.Tensor, blocks: Sequence[torch.nn.Module], policy, prefix_tokens: int,
               qkv: QKV, attn_out: AttnOut, mlp: MLP) -> torch.Tensor:
    """The hand-written pre-norm block loop: x += attn(x); policy step; x += mlp(x)."""
    state = PolicyState(policy, len(blocks), x.shape[1], prefix_tokens)
    for index, block in enumerate(blocks):
        q, k, v, scale = qkv(block, x)
        o = attention(q, k, v, scale, state.attn_mask(q.dtype))
        x = x + attn_out(block, o, x)
        x = state.step(index, x, q, k, scale)
        x = x + mlp(block, x)
    return x
