"""Insert attention-rank pruning at the chosen blocks (EViT, Liang et al., ICLR 2022)."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.passes.context import PassContext, replace_uses_except
from tokensparse.patterns.graph import insert_call
from tokensparse.policies import TopK
from tokensparse.policies.topk import kept_count
from tokensparse.runtime.ops import TOPK_PRUNE


def prune_tokens_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """TopK: after the attention of each chosen block keep the tokens the CLS row attends to most."""
    if not isinstance(ctx.policy, TopK):
        return gm
    policy, p = ctx.policy, ctx.prefix_tokens
    tokens = ctx.blocks[0].tokens
    for block in ctx.blocks:
        ctx.tokens_in[block.index] = tokens
        if block.index not in policy.layers:
            continue
        keep = kept_count(tokens, p, policy.keep)
        stream, site = block.attn_residual, block.site
        step = insert_call(gm.graph, stream.next, TOPK_PRUNE,
                           (stream, site.q, site.k, site.scale, keep, p, policy.fuse, site.mask))
        replace_uses_except(stream, step, keep={step})
        after = p + keep + int(policy.fuse)
        ctx.acted_blocks.append(block.index)
        ctx.record("prune_tokens", f"{block.path}: keep {after} of {tokens} tokens")
        tokens = after
    ctx.tokens_in[len(ctx.blocks)] = tokens
    return gm
