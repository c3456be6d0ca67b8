"""Every tokensparse:: custom op, by name. Each op is declared in its policy's file (its eager implementation is
the policy's plain-PyTorch reference function, its fake rule beside it); Inductor treats an op that stays in
a graph as an opaque call, torch.export keeps it as a single node."""

from __future__ import annotations

import os

import torch

from tokensparse.policies.token_axis import TOKENS_AS_SYMBOL
from tokensparse.policies.adaptive_kv import ADAPTIVE_KEEP
from tokensparse.policies.divprune import KEEP_DIVERSE
from tokensparse.policies.dtd import KEEP_CHANGED_VIDEO
from tokensparse.policies.fastv import KEEP_VISION
from tokensparse.policies.h2o import H2O_KEEP, H2O_STEP_KEEP, HEAVY_AND_RECENT
from tokensparse.policies.kv_policy import ATTENTION_COLUMN_SUMS, KV_EVICT
from tokensparse.policies.op_shapes import static_token_counts
from tokensparse.policies.selection import SELECT_TOP_K, SPLIT_TOP_K
from tokensparse.policies.snapkv import SNAPKV_KEEP
from tokensparse.policies.streamingllm import KEEP_SINKS_AND_WINDOW
from tokensparse.policies.token_sources import FEATURES_AT_SOURCE_ROWS
from tokensparse.policies.tome import MERGE_MATCHES, TOME_MERGE
from tokensparse.policies.topk import TOPK_PRUNE
from tokensparse.policies.vision_budget import VISION_BUDGET_KEEP
from tokensparse.policies.visionzip import KEEP_IMAGE_ROWS, VISIONZIP

__all__ = ["ADAPTIVE_KEEP", "ATTENTION_COLUMN_SUMS", "FEATURES_AT_SOURCE_ROWS", "H2O_KEEP", "H2O_STEP_KEEP",
           "HEAVY_AND_RECENT", "KEEP_CHANGED_VIDEO", "KEEP_DIVERSE", "KEEP_IMAGE_ROWS", "KEEP_SINKS_AND_WINDOW",
           "KEEP_VISION", "KV_EVICT", "MERGE_MATCHES", "SELECT_TOP_K", "SNAPKV_KEEP", "SPLIT_TOP_K", "TOKENS_AS_SYMBOL",
           "TOME_MERGE", "TOPK_PRUNE", "VISIONZIP", "VISION_BUDGET_KEEP", "is_tokensparse_target", "static_token_counts"]


def is_tokensparse_target(target) -> bool:
    """A node target that tokensparse inserted: one of its custom ops or one of its helper functions."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "tokensparse"
    return getattr(target, "__module__", "").startswith("tokensparse")


# CUDA implementations from the Triton kernels (tokensparse/runtime/triton_ops.py), opt-in:
# TOKENSPARSE_TRITON_KERNELS=1. They pass their tests on an H100, where the ToMe merge kernel measured slower
# than PyTorch's own ops (docs/deploy.md), so by default the plain PyTorch implementations serve CUDA too.
if os.environ.get("TOKENSPARSE_TRITON_KERNELS") == "1" and torch.cuda.is_available():
    import tokensparse.runtime.triton_ops  # noqa: F401
