"""Replace the policies' ops in a rewritten dynamo graph with their policies' own PyTorch functions, so
that Inductor compiles the policy math with the model (fused with its neighbours, differentiable, no eager op
per step) instead of calling an opaque op. The ops stay where one node is the point: torch.export, ONNX,
TensorRT."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.policies.token_sources import features_at_source_rows
from tokensparse.policies.tome import accumulating_merge, tome_step
from tokensparse.policies.topk import topk_step
from tokensparse.policies.visionzip import visionzip_from_attention
from tokensparse.runtime.ops import FEATURES_AT_SOURCE_ROWS, TOME_MERGE, TOPK_PRUNE, VISIONZIP


def tome_merge_step(x, size, keys, r: int, protected: int):
    """tokensparse::tome_merge as the policy's function (r = 0 changes nothing), its sums into B tokens by an
    accumulating index_put, which Inductor compiles (it leaves scatter_reduce to an eager call)."""
    return tome_step(x, size, keys, r, protected, merge=accumulating_merge)


def visionzip_step(hidden, q, k, scale: float, dominant: int, contextual: int, protected: int):
    """tokensparse::visionzip as the policy's function."""
    return visionzip_from_attention(hidden, q, k, scale, dominant, contextual, protected)


# The ops whose outputs carry gradients (merged or gathered activations) and whose counts are known when
# compiling; the ops that only choose positions stay ops (their selections carry no gradient).
STEPS = {TOME_MERGE: tome_merge_step, TOPK_PRUNE: topk_step, VISIONZIP: visionzip_step,
         FEATURES_AT_SOURCE_ROWS: features_at_source_rows}


def inline_policy_steps(gm: fx.GraphModule) -> fx.GraphModule:
    """Point every policy op node of `gm` (and of its submodules) at its PyTorch function, in place."""
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in STEPS:
                node.target = STEPS[node.target]
                changed = True
        if changed:
            module.recompile()
    return gm
