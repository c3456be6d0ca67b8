"""Verify a rewritten graph: lint it, propagate FakeTensors through all of it, and check that outputs
differ from the original only along token axes."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tokensparse.passes.context import PassContext
from tokensparse.passes.fake import fake_propagation
from tokensparse.passes.sizes import same_size
from tokensparse.patterns.graph import MatchFailure, output_shapes


def verify_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Every node of the rewritten graph must have been run on fake tensors (the sizes pass does this;
    otherwise propagate here); outputs may change only along token axes."""
    gm.graph.lint()
    gm.recompile()
    if not ctx.propagated:
        try:
            with fake_propagation(ctx.fake_mode):
                FakeTensorProp(gm, ctx.fake_mode).propagate_dont_convert_inputs(*ctx.fake_inputs)
        except Exception as error:
            raise MatchFailure(f"FakeTensor verification failed: {type(error).__name__}: "
                               f"{str(error).splitlines()[0]}")
        ctx.propagated = True
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

