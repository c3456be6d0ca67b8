"""Lower a rewritten torch.export graph to plain aten ops that every ONNX consumer runs: the tokensparse::
custom ops become their policies' own PyTorch code (one source of truth), views become reshapes, and
scaled_dot_product_attention becomes its math (MatMul-Softmax-MatMul, which torch.onnx emits at opset
18 anyway)."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from tokensparse.policies.adaptive_kv import adaptive_keep
from tokensparse.policies.divprune import divprune_keep_in_sequence
from tokensparse.policies.fastv import fastv_keep
from tokensparse.policies.h2o import h2o_keep, h2o_step_keep
from tokensparse.policies.kv_policy import attention_column_sums, evict_positions
from tokensparse.policies.snapkv import snapkv_keep
from tokensparse.policies.token_sources import features_at_source_rows
from tokensparse.policies.tome import tome_step
from tokensparse.policies.topk import topk_step
from tokensparse.policies.visionzip import image_rows_keep, visionzip_from_attention
from tokensparse.runtime.ops import (ADAPTIVE_KEEP, ATTENTION_COLUMN_SUMS, FEATURES_AT_SOURCE_ROWS, H2O_KEEP,
                                     H2O_STEP_KEEP, KEEP_DIVERSE, KEEP_IMAGE_ROWS, KEEP_VISION, KV_EVICT, MERGE_MATCHES,
                                     SELECT_TOP_K, SNAPKV_KEEP, SPLIT_TOP_K, TOME_MERGE, TOPK_PRUNE, VISION_BUDGET_KEEP,
                                     VISIONZIP)
from tokensparse.policies.vision_budget import vision_budget_keep_call

SDPA = torch.ops.aten.scaled_dot_product_attention.default


# Each tokensparse op's plain-PyTorch implementation, traced into aten ops when the graph is re-exported.
POLICY_CODE = {TOME_MERGE: tome_step, TOPK_PRUNE: topk_step, KEEP_VISION: fastv_keep,
               VISIONZIP: visionzip_from_attention, KEEP_IMAGE_ROWS: image_rows_keep,
               KEEP_DIVERSE: divprune_keep_in_sequence, FEATURES_AT_SOURCE_ROWS: features_at_source_rows,
               SNAPKV_KEEP: snapkv_keep, KV_EVICT: evict_positions, ATTENTION_COLUMN_SUMS: attention_column_sums,
               H2O_KEEP: h2o_keep, H2O_STEP_KEEP: h2o_step_keep, ADAPTIVE_KEEP: adaptive_keep,
               VISION_BUDGET_KEEP: vision_budget_keep_call}


def tome_step_with_merge_plugin(x, size, keys, r: int, protected: int):
    """ToMe's step with the similarities in standard ops, and the choice of the r best edges and the merge
    as ops that become kernel plugins (no TopK, whose K TensorRT caps at 3840)."""
    return tome_step(x, size, keys, r, protected, merge=MERGE_MATCHES, split=SPLIT_TOP_K)


def topk_step_with_select_plugin(x, q, k, scale: float, keep: int, protected: int, fuse: bool, attn_mask=None):
    """TopK's step with the scores and gather in standard ops and the selection as a kernel plugin."""
    return topk_step(x, q, k, scale, keep, protected, fuse, attn_mask, select=SELECT_TOP_K)


# The policy code that plugins="kernel" traces instead: each kernel a plugin becomes stays one op.
KERNEL_PLUGIN_CODE = {TOME_MERGE: tome_step_with_merge_plugin, TOPK_PRUNE: topk_step_with_select_plugin}


def inline_policy_code(gm: fx.GraphModule, keep_ops=frozenset(), code=None) -> fx.GraphModule:
    """Replace tokensparse:: op calls (except those in `keep_ops`, which become plugin nodes) by their
    policy functions (`code` takes precedence over POLICY_CODE), then views by reshapes."""
    code = {**POLICY_CODE, **(code or {})}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in keep_ops:
            continue
        if node.target in code:
            node.target = code[node.target]
    return keep_views_as_reshapes(gm)


def keep_views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """aten.view -> aten.reshape: a view whose input layout changes when attention gains a mask (or when
    the graph is decomposed again for ONNX) must copy instead."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()
    return gm


def attention_math(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale=None, enable_gqa: bool = False):
    """softmax(q k^T * scale + mask) v: scaled_dot_product_attention's definition, for export."""
    if dropout_p != 0.0:
        raise ValueError(f"attention with dropout_p={dropout_p} cannot be exported for inference: "
                         f"call model.eval() first")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        rows, cols = logits.shape[-2], logits.shape[-1]
        allowed = torch.ones(rows, cols, dtype=torch.bool, device=logits.device).tril(cols - rows)
        logits = logits.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:  # additive, so that exports show the common MatMul-Add(mask)-Softmax form
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=logits.dtype, device=logits.device).masked_fill(
                ~attn_mask, -math.inf)
        logits = logits + attn_mask
    probabilities = logits.softmax(dim=-1)
    if is_causal or attn_mask is not None:
        # A row that masks every key (a padding query) is NaN after softmax; SDPA gives it zeros, and so must
        # the export: its NaN output would reach the next layer's keys at that position, where a mask adds to
        # NaN scores instead of hiding them. ONNX: the usual Where(IsNaN) guard.
        probabilities = torch.where(torch.isnan(probabilities), 0.0, probabilities)
    return probabilities @ value


DECOMPOSITIONS = {SDPA: attention_math}
