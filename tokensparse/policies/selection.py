"""Top-k in token order: the one selection rule every path shares (eager, Inductor, torch.export/ONNX, the
kernel plugins' references). The k largest scores, ties to the lower index, returned in ascending index order.

A stable descending sort defines the order: torch.topk leaves ties unspecified (CPU and CUDA differ), ONNX
TopK and the Triton select kernel (runtime/kernels/topk_select.py) break them toward the lower index. Inductor
compiles aten.sort.stable; torch.onnx exports it as TopK over the whole axis (export/translations.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim by descending score, ties to the lower index (NaN ranks first, as in
    torch.sort)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices


def top_k_in_order(scores: torch.Tensor, k) -> torch.Tensor:
    """[..., k] int64: the indices of the k largest scores along the last dim, ties to the lower index, in
    ascending index order. k may be a SymInt."""
    return rank_order(scores)[..., :k].sort(dim=-1).values


def split_in_order(scores: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor]:
    """([..., k], [..., N - k]): top_k_in_order's indices and every other index, both in ascending order
    (ToMe's r best edges, as the TopKSplit kernel computes them)."""
    order = rank_order(scores)
    return order[..., :k].sort(dim=-1).values, order[..., k:].sort(dim=-1).values


@torch.library.custom_op("tokensparse::select_top_k", mutates_args=())
def select_top_k_op(scores: Tensor, k: int) -> Tensor:
    """[B, k] int64: each row's k best scores' indices in token order (ties to the lower index, as ONNX TopK
    and the kernel): the TopKSelect plugin."""
    return top_k_in_order(scores, k)


@select_top_k_op.register_fake
def _select_top_k_fake(scores, k):
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("tokensparse::split_top_k", mutates_args=())
def split_top_k_op(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """([B, k], [B, N - k]) int64: each row's k best scores' indices and the others, both in token order
    (ties to the lower index): the TopKSplit plugin."""
    return split_in_order(scores, k)


@split_top_k_op.register_fake
def _split_top_k_fake(scores, k):
    batch, tokens = scores.shape
    return scores.new_empty(batch, k, dtype=torch.int64), scores.new_empty(batch, tokens - k, dtype=torch.int64)


SELECT_TOP_K = torch.ops.tokensparse.select_top_k.default
SPLIT_TOP_K = torch.ops.tokensparse.split_top_k.default
