"""Replace the vision policies' ops in a rewritten dynamo graph with their policies' own PyTorch functions, so
that Inductor compiles the policy math with the model (fused with its neighbours, differentiable, no eager op
per step) instead of calling an opaque op. The ops stay where one node is the point: torch.export, ONNX,
TensorRT."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.policies.tome import tome_step
from tokensparse.policies.topk import topk_step
from tokensparse.runtime.ops import TOME_MERGE, TOPK_PRUNE


def tome_merge_step(x, size, keys, r: int, protected: int):
    """tokensparse::tome_merge as the policy's function (r = 0 changes nothing)."""
    return tome_step(x, size, keys, r, protected)


STEPS = {TOME_MERGE: tome_merge_step, TOPK_PRUNE: topk_step}


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
