"""Replace the policies' ops in a rewritten dynamo graph with their policies' own PyTorch functions, so
that Inductor compiles the policy math with the model (fused with its neighbours, differentiable, no eager op
per step) instead of calling an opaque op. The ops stay where one node is the point: torch.export, ONNX,
TensorRT."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.policies.fastv import KEEP_VISION, fastv_keep_step
from tokensparse.policies.token_axis import TOKENS_AS_SYMBOL, same_tokens
from tokensparse.policies.token_sources import FEATURES_AT_SOURCE_ROWS, features_at_source_rows
from tokensparse.policies.tome import TOME_MERGE, tome_merge_step
from tokensparse.policies.topk import TOPK_PRUNE, topk_step
from tokensparse.policies.visionzip import KEEP_IMAGE_ROWS, VISIONZIP, image_rows_keep_step, visionzip_from_attention


# The ops whose outputs carry gradients (merged or gathered activations) and whose counts are known when
# compiling; the ops that only choose positions stay ops (their selections carry no gradient). FastV's and
# PyramidDrop's selection (KEEP_VISION) is inlined too (fastv_keep_step): a sort or two per stage outside Inductor's
# kernels, and no host read where tokensparse.compile's forward checked the image-token counts (else two per
# stage), where the op ran 24 aten ops eagerly. VisionZip's mapping of kept encoder rows to sequence positions
# (KEEP_IMAGE_ROWS) is inlined as image_rows_keep_step: a static kept length, and one host read for its check
# unless the forward checked the counts, where the op ran 12 aten ops eagerly.
STEPS = {TOME_MERGE: tome_merge_step, TOPK_PRUNE: topk_step, VISIONZIP: visionzip_from_attention,
         FEATURES_AT_SOURCE_ROWS: features_at_source_rows, TOKENS_AS_SYMBOL: same_tokens, KEEP_VISION: fastv_keep_step,
         KEEP_IMAGE_ROWS: image_rows_keep_step}


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
