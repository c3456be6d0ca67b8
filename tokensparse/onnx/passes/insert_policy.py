"""Splice the vision-encoder policy's declared token step (policy.tower_step) in after the attention residual of
the blocks it acts on, as the ONNX graph of its op (ToMe, Bolya et al. 2023; EViT-style top-k pruning, Liang et
al. 2022)."""

from __future__ import annotations

import onnx_ir as ir

from tokensparse.onnx.passes.context import OnnxPassContext
from tokensparse.onnx.passes.policy_graphs import tome_graph, topk_graph
from tokensparse.onnx.passes.splice import inline_graph
from tokensparse.pipeline import MatchFailure
from tokensparse.policies import POLICIES
from tokensparse.policies.tome import TOME_MERGE
from tokensparse.policies.topk import TOPK_PRUNE
from tokensparse.policies.tower_step import TowerStep

# The vision-encoder policies (Config(vision=...)): each tower step's op has an ONNX graph below.
ONNX_NATIVE_NAMES = tuple(cls.__name__ for cls in POLICIES.values() if cls.stage == "vision")


def _tome(ctx: OnnxPassContext, block, step: TowerStep, tokens: int, size):
    """ToMe's merge (r, prefix from the step's constants): (the merged stream, the sizes after it)."""
    r, prefix = step.constants()[-2:]
    heads, head_dim = _static(block.attention.keys_t, (1, 2), f"block {block.index} keys")
    channels = _static(block.residual, (2,), f"block {block.index} stream")[0]
    graph = tome_graph(tokens, channels, heads, head_dim, r, prefix, size is None)
    inputs = [block.residual, block.attention.keys_t] + ([size] if size is not None else [])
    new_x, size = inline_graph(ctx.graph, graph, inputs, block.residual_add, f"tokensparse.tome{block.index}.")
    ctx.sizes_after[block.index] = size
    return new_x, size


def _topk(ctx: OnnxPassContext, block, step: TowerStep, tokens: int, size):
    """Attention-rank pruning (keep, prefix, fuse from the step's constants): (the kept stream, the sizes)."""
    keep, prefix, fuse = step.constants()[4:7]
    heads = _static(block.attention.probabilities, (1,), f"block {block.index} attention")[0]
    channels = _static(block.residual, (2,), f"block {block.index} stream")[0]
    graph = topk_graph(tokens, channels, heads, keep, prefix, fuse)
    [new_x] = inline_graph(ctx.graph, graph, [block.residual, block.attention.probabilities], block.residual_add,
                           f"tokensparse.topk{block.index}.")
    return new_x, size


ONNX_STEPS = {TOME_MERGE: _tome, TOPK_PRUNE: _topk}


def insert_policy_pass(model: ir.Model, ctx: OnnxPassContext) -> ir.Model:
    """Insert the policy's tower step (ToMe, Bolya et al. 2023; top-k, Liang et al. 2022) per acting block."""
    tokens = ctx.tokens
    size = None
    depth = len(ctx.blocks)
    for block in ctx.blocks:
        ctx.tokens_in.append(tokens)
        step = ctx.policy.tower_step(block.index, depth, tokens, ctx.prefix_tokens)
        if step is None:
            continue
        if step.op not in ONNX_STEPS:
            raise MatchFailure(f"policy {ctx.policy.name!r}'s step {step.kind} has no ONNX-native rewrite")
        before = set(ctx.graph)
        new_x, size = ONNX_STEPS[step.op](ctx, block, step, tokens, size)
        tokens = step.tokens_after
        added = set(ctx.graph) - before
        ctx.inserted |= added
        if ctx.first_cut is None:
            ctx.first_cut = min(added, key=ctx.positions().__getitem__)
        ctx.redirect_uses(block.residual, new_x, keep=ctx.inserted)    # the block's MLP reads the reduced stream
    ctx.tokens_in.append(tokens)
    return model


def _static(value, dims: tuple, what: str) -> list[int]:
    shape = value.shape
    if shape is None or any(not isinstance(shape[d], int) for d in dims):
        raise MatchFailure(f"{what} ({value.name!r}) has shape {shape}: static sizes are needed at dims {dims}")
    return [shape[d] for d in dims]
