"""Insert ToMe's bipartite soft matching merge after each block's attention residual
(Bolya et al., ICLR 2023)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tokensparse.passes.context import PassContext, replace_uses_except
from tokensparse.patterns.graph import insert_call
from tokensparse.policies import ToMe
from tokensparse.policies.tome import capped_r
from tokensparse.runtime.ops import TOME_MERGE


def initial_sizes(x: torch.Tensor) -> torch.Tensor:
    """Every token starts as one patch: s = 1, shape [B, N, 1]."""
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)


def merge_tokens_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """ToMe: merge r tokens per block between attention and MLP, tracking token sizes."""
    if not isinstance(ctx.policy, ToMe):
        return gm
    graph, p = gm.graph, ctx.prefix_tokens
    schedule = ctx.policy.r_per_block(len(ctx.blocks))
    tokens, size = ctx.blocks[0].tokens, None
    for block, requested in zip(ctx.blocks, schedule):
        ctx.tokens_in[block.index] = tokens
        ctx.size_nodes[block.index] = size
        r = capped_r(requested, tokens, p)
        if r == 0:
            continue
        stream, anchor = block.attn_residual, block.attn_residual.next
        keep = set()
        if size is None:
            size = insert_call(graph, anchor, initial_sizes, (stream,))
            keep.add(size)
        step = insert_call(graph, anchor, TOME_MERGE, (stream, size, block.site.k, r, p))
        merged = insert_call(graph, anchor, operator.getitem, (step, 0))
        size = insert_call(graph, anchor, operator.getitem, (step, 1))
        replace_uses_except(stream, merged, keep=keep | {step})
        ctx.acted_blocks.append(block.index)
        ctx.record("merge_tokens", f"{block.path}: merge {r} of {tokens} tokens")
        tokens -= r
    ctx.tokens_in[len(ctx.blocks)] = tokens
    return gm

