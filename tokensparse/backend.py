"""The torch.compile backend named "tokensparse": rewrite the dynamo graph, then Inductor."""

from __future__ import annotations

from tokensparse.config import config_from_options
from tokensparse.passes.fake import allow_symbolic_token_counts
from tokensparse.rewrite import rewrite_graph


def tokensparse_backend(gm, example_inputs, options=None, **unused):
    """torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 13})."""
    config = config_from_options(options)
    result = rewrite_graph(gm, example_inputs, config)
    if not config.inductor:
        return result.gm.forward
    from torch._inductor.compile_fx import compile_fx

    if not result.changed:
        return compile_fx(result.gm, example_inputs)
    with allow_symbolic_token_counts(result.context.fake_mode):
        return compile_fx(result.gm, example_inputs)
