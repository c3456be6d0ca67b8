"""Verify a rewritten graph: it lints, the sizes pass has run every node on FakeTensors, and outputs
differ from the original only along token axes."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.passes.context import PassContext
from tokensparse.passes.sizes import same_size
from tokensparse.patterns.graph import MatchFailure, output_shapes


def verify_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The rewritten graph lints, every node was run on fake tensors (by the sizes pass, which runs
    first and fails on any shape mismatch), and outputs change only along token axes."""
    gm.graph.lint()
    gm.recompile()
    if not ctx.propagated:
        raise RuntimeError("verify_pass needs rederive_sizes_pass to run before it (see passes/__init__.py)")
    token_counts = {ctx.blocks[0].tokens}
    old = ctx.original_output_shapes
    new = output_shapes(gm)
    if old is not None:
        if len(old) != len(new):
            raise MatchFailure(f"the rewritten graph returns {len(new)} outputs instead of {len(old)}")
        for index, (before, after) in enumerate(zip(old, new)):
            if before is None or after is None or (len(before) == len(after) and all(map(same_size, before, after))):
                continue
            bad = len(before) != len(after) or any(not same_size(b, a) and b not in token_counts
                                                   for b, a in zip(before, after))
            if bad:
                raise MatchFailure(f"output {index} changed shape from {list(before)} to {list(after)} "
                                   f"outside the token axis")
    return gm

