"""Top-k in token order: the one selection rule every path shares (eager, Inductor, torch.export/ONNX, the
kernel plugins' references). The k largest scores, ties to the lower index, returned in ascending index order.

A stable descending sort defines the order: torch.topk leaves ties unspecified (CPU and CUDA differ), ONNX
TopK and the Triton select kernel (runtime/kernels/topk_select.py) break them toward the lower index. Inductor
compiles aten.sort.stable; torch.onnx exports it as TopK over the whole axis (export/translations.py)."""

from __future__ import annotations

import torch


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
