"""Triton kernels for the steps TensorRT lacks or does badly, each with a plain PyTorch reference. They
run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the CPU tests run them)."""

from tokensparse.runtime.kernels.divprune_greedy import divprune_greedy, divprune_select_triton
from tokensparse.runtime.kernels.kv_compact import kv_compact, kv_compact_reference
from tokensparse.runtime.kernels.tome_merge import tome_merge_kernel, tome_merge_reference
from tokensparse.runtime.kernels.topk_select import (topk_gather, topk_gather_reference, topk_select,
                                                      topk_split)

__all__ = [
    "divprune_greedy",
    "divprune_select_triton",
    "kv_compact",
    "kv_compact_reference",
    "tome_merge_kernel",
    "tome_merge_reference",
    "topk_gather",
    "topk_gather_reference",
    "topk_select",
    "topk_split",
]
