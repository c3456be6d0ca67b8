"""The Triton kernels as torch.library triton_ops (torch.compile and Inductor see through them), and the
CUDA implementations of the tokensparse:: policy ops built on them. The CPU implementations stay the
policies' plain PyTorch code. Importing this module registers everything; it needs Triton."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tokensparse.policies.divprune import divprune_keep
from tokensparse.policies.tome import tome_step
from tokensparse.policies.topk import attention_received, join_kept
from tokensparse.runtime.kernels import (divprune_select_triton, tome_merge_kernel, topk_gather, topk_select,
                                         topk_split)


@triton_op("tokensparse::tome_merge_rows", mutates_args={})
def tome_merge_rows(x: Tensor, size: Tensor, src_idx: Tensor, dst_idx: Tensor, unm_idx: Tensor,
                    protected: int) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted merge for given matches (Triton)."""
    return tome_merge_kernel(x, size, src_idx, dst_idx, unm_idx, protected, launch=wrap_triton)


@triton_op("tokensparse::topk_gather", mutates_args={})
def topk_gather_op(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the k best scores in token order, and x gathered at them (Triton; any k)."""
    return topk_gather(x, scores, k, launch=wrap_triton)


def tome_merge_triton(x, size, keys, r: int, protected: int):
    """tokensparse::tome_merge with the matching in PyTorch and the merge in Triton."""
    if r == 0:
        return x.clone(), size.clone()
    return tome_step(x, size, keys, r, protected, merge=tome_merge_rows)


def topk_prune_triton(x, q, k, scale: float, keep: int, protected: int, fuse: bool, attn_mask=None):
    """tokensparse::topk_prune with the scores in PyTorch and selection plus gather in Triton."""
    scores = attention_received(q, k, scale, protected, attn_mask)
    rest = x[:, protected:].contiguous()
    kept_idx, kept = topk_gather_op(rest, scores, keep)
    return join_kept(x, rest, kept, kept_idx, scores, protected, fuse)


def keep_diverse_triton(features, image_mask, keep: float, image_tokens=None):
    """tokensparse::keep_diverse_vision_tokens with DivPrune's greedy loop in one Triton launch."""
    return divprune_keep(features, image_mask, keep, select=divprune_select_triton, image_tokens=image_tokens)


torch.library.register_kernel("tokensparse::tome_merge", "cuda", tome_merge_triton)
torch.library.register_kernel("tokensparse::topk_prune", "cuda", topk_prune_triton)
torch.library.register_kernel("tokensparse::keep_diverse_vision_tokens", "cuda", keep_diverse_triton)
# The ops that plugins="kernel" exports as plugin nodes run the plugins' own kernels on a GPU.
torch.library.register_kernel("tokensparse::merge_matches", "cuda", tome_merge_kernel)
torch.library.register_kernel("tokensparse::select_top_k", "cuda", topk_select)
torch.library.register_kernel("tokensparse::split_top_k", "cuda", topk_split)
