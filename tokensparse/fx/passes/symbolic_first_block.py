"""For regional compilation: the tokens entering the first block get a symbolic count, as the tokens after a cut
have, so that the first block reads its sizes from its input and shares the compile of the blocks after it
(tokensparse.regions compiles them with the token count as a backed symbol)."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.fx.passes.context import PassContext, replace_uses_except
from tokensparse.fx.passes.reduce_tokens import initial_sizes
from tokensparse.fx.patterns.graph import insert_call
from tokensparse.policies.token_axis import TOKENS_AS_SYMBOL


def symbolic_first_block_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Regional compilation: the first block's token count symbolic, as after a cut, to share one compile."""
    # When the blocks compile one region each (tokensparse.regions shares one compile between blocks of one structure
    # and token counts of one pattern). Where the policy's first step tracks token sizes (ToMe), they start before
    # the first block, whose attention then adds their bias, log(1) = 0, as the blocks after a merge add theirs.
    if not ctx.caller.compiled_by_regions or not ctx.blocks or ctx.vlm.language is not None:
        return gm
    first = ctx.blocks[0]
    if first.input.op == "placeholder":
        return gm               # the blocks start the graph: nothing to split off before them
    symbolic = insert_call(gm.graph, first.input.next, TOKENS_AS_SYMBOL, (first.input,))
    replace_uses_except(first.input, symbolic, keep={symbolic})
    first.input = symbolic
    step = ctx.policy.tower_step(first.index, len(ctx.blocks), first.tokens, ctx.prefix_tokens)
    if step is not None and step.sized:
        ctx.size_nodes[first.index] = insert_call(gm.graph, symbolic.next, initial_sizes, (symbolic,))
    ctx.record("symbolic_first_block", f"{first.path}: its tokens' count is symbolic, as after a cut")
    return gm
