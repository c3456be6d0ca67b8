"""Insert a vision-encoder policy's token step after each block's attention residual, where the policy
declares one (ToMe's merge, Bolya et al., ICLR 2023; EViT-style attention-rank pruning, Liang et al., ICLR
2022), tracking the token sizes of a step that merges."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tokensparse.fx.passes.context import PassContext, replace_uses_except
from tokensparse.fx.patterns.graph import insert_call
from tokensparse.policies.tower_step import CountOfTokens


def initial_sizes(x: torch.Tensor) -> torch.Tensor:
    """Every token starts as one patch: s = 1, shape [B, N, 1]."""
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)


def _counts_from_input(graph: fx.Graph, anchor: fx.Node, stream: fx.Node, inserted: set):
    """Computes a step's CountOfTokens arguments in the graph from the stream's token count (adding its nodes to
    `inserted`), so that blocks that keep the same fraction of different counts are one graph (one compile)."""
    def count_of_tokens(count: CountOfTokens) -> fx.Node:
        tokens = insert_call(graph, anchor, torch.ops.aten.sym_size.int, (stream, 1))
        inserted.add(tokens)
        return insert_call(graph, anchor, count.rule, (tokens, *count.args))
    return count_of_tokens


def reduce_tokens_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """policy.tower_step after each attention residual (ToMe, Bolya et al. 2023; EViT, Liang et al. 2022)."""
    # policy.tower_step(block) after each block's attention residual; the MLP and later blocks read its output. The
    # MLP and later blocks read the step's output.
    if not ctx.blocks:
        return gm
    graph, prefix, depth = gm.graph, ctx.prefix_tokens, len(ctx.blocks)
    tokens, size = ctx.blocks[0].tokens, ctx.size_nodes.get(ctx.blocks[0].index)    # sizes may start before
    for block in ctx.blocks:
        ctx.tokens_in[block.index] = tokens
        ctx.size_nodes[block.index] = size
        step = ctx.policy.tower_step(block.index, depth, tokens, prefix)
        if step is None:
            continue
        stream, anchor, site = block.attn_residual, block.attn_residual.next, block.site
        keep = set()
        if step.sized and size is None:
            size = insert_call(graph, anchor, initial_sizes, (stream,))
            keep.add(size)
        values = {"x": stream, "size": size, "query": site.q, "keys": site.k, "scale": site.scale, "mask": site.mask}
        counts = _counts_from_input(graph, anchor, stream, keep) if ctx.caller.compiled_by_regions else None
        call = insert_call(graph, anchor, step.op, step.arguments(values, counts))
        reduced = call
        if step.sized:
            reduced = insert_call(graph, anchor, operator.getitem, (call, 0))
            size = insert_call(graph, anchor, operator.getitem, (call, 1))
        replace_uses_except(stream, reduced, keep=keep | {call})
        ctx.acted_blocks.append(block.index)
        ctx.record(step.kind, f"{block.path}: {step.note}")
        tokens = step.tokens_after
    ctx.tokens_in[depth] = tokens
    return gm
