"""Verify a rewritten graph: lint it, propagate FakeTensors through all of it, and check that outputs
differ from the original only along token axes."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tokensparse.passes.context import PassContext
from tokensparse.patterns.graph import MatchFailure, output_shapes


def verify_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """FakeTensor propagation over the whole rewritten graph; any failure rejects the rewrite."""
    gm.graph.lint()
    gm.recompile()
    try:
        FakeTensorProp(gm, ctx.fake_mode).propagate_dont_convert_inputs(*ctx.fake_inputs)
    except Exception as error:
        raise MatchFailure(f"FakeTensor verification failed: {type(error).__name__}: {str(error).splitlines()[0]}")
    token_counts = {ctx.blocks[0].tokens}
    old = ctx.original_output_shapes
    new = output_shapes(gm)
    if old is not None:
        if len(old) != len(new):
            raise MatchFailure(f"the rewritten graph returns {len(new)} outputs instead of {len(old)}")
        for index, (before, after) in enumerate(zip(old, new)):
            if before is None or after is None or before == after:
                continue
            bad = len(before) != len(after) or any(b != a and b not in token_counts for b, a in zip(before, after))
            if bad:
                raise MatchFailure(f"output {index} changed shape from {list(before)} to {list(after)} "
                                   f"outside the token axis")
    return gm

