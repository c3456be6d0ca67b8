"""Splice the policy's step graphs in after the attention residual of the blocks it acts on (ToMe,
Bolya et al. 2023, in every block; EViT-style top-k pruning, Liang et al. 2022, at chosen blocks)."""

from __future__ import annotations

from tokensparse.export.onnx_passes.context import OnnxPassContext
from tokensparse.export.onnx_passes.policy_graphs import tome_graph, topk_graph
from tokensparse.export.onnx_passes.splice import inline_graph
from tokensparse.patterns.graph import MatchFailure
from tokensparse.policies.tome import ToMe, capped_r
from tokensparse.policies.topk import TopK, kept_count

ONNX_NATIVE_POLICIES = (ToMe, TopK)
ONNX_NATIVE_NAMES = tuple(policy.__name__ for policy in ONNX_NATIVE_POLICIES)


def insert_policy_pass(ctx: OnnxPassContext) -> None:
    """Insert one policy step per acting block and rewire the block's MLP onto the reduced stream."""
    tokens = ctx.tokens
    size = None
    depth = len(ctx.blocks)
    for block in ctx.blocks:
        ctx.tokens_in.append(tokens)
        before = set(ctx.graph)
        if isinstance(ctx.policy, ToMe):
            r = capped_r(ctx.policy.r_per_block(depth)[block.index], tokens, ctx.prefix_tokens)
            if r == 0:
                continue
            heads, head_dim = _static(block.attention.keys_t, (1, 2), f"block {block.index} keys")
            channels = _static(block.residual, (2,), f"block {block.index} stream")[0]
            step = tome_graph(tokens, channels, heads, head_dim, r, ctx.prefix_tokens, size is None)
            inputs = [block.residual, block.attention.keys_t] + ([size] if size is not None else [])
            new_x, size = inline_graph(ctx.graph, step, inputs, block.residual_add, f"tokensparse.tome{block.index}.")
            ctx.sizes_after[block.index] = size
            tokens -= r
        elif isinstance(ctx.policy, TopK):
            if block.index not in ctx.policy.layers:
                continue
            keep = kept_count(tokens, ctx.prefix_tokens, ctx.policy.keep)
            heads = _static(block.attention.probabilities, (1,), f"block {block.index} attention")[0]
            channels = _static(block.residual, (2,), f"block {block.index} stream")[0]
            step = topk_graph(tokens, channels, heads, keep, ctx.prefix_tokens, ctx.policy.fuse)
            [new_x] = inline_graph(ctx.graph, step, [block.residual, block.attention.probabilities],
                                   block.residual_add, f"tokensparse.topk{block.index}.")
            tokens = ctx.prefix_tokens + keep + int(ctx.policy.fuse)
        else:
            raise MatchFailure(f"policy {ctx.policy.name!r} has no ONNX-native rewrite")
        added = set(ctx.graph) - before
        ctx.inserted |= added
        if ctx.first_cut is None:
            ctx.first_cut = min(added, key=ctx.positions().__getitem__)
        ctx.redirect_uses(block.residual, new_x, keep=ctx.inserted)
    ctx.tokens_in.append(tokens)


def _static(value, dims: tuple, what: str) -> list[int]:
    shape = value.shape
    if shape is None or any(not isinstance(shape[d], int) for d in dims):
        raise MatchFailure(f"{what} ({value.name!r}) has shape {shape}: static sizes are needed at dims {dims}")
    return [shape[d] for d in dims]
