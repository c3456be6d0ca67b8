"""Capture a model's dynamo graphs without compiling them (for explain() and tests)."""

from __future__ import annotations

import torch


def capture_graphs(model, *args, **kwargs) -> list:
    """Run `model(*args, **kwargs)` under dynamo once and return [(GraphModule, example_inputs)]."""
    graphs = []

    def record(gm, example_inputs, **unused):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    from tokensparse.runtime.hf import install_output_hooks

    install_output_hooks(model)
    compiled = torch.compile(model, backend=record, isolate_recompiles=True)
    # capture_scalar_outputs: a VLM's image merge counts image tokens with .item().
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled(*args, **kwargs)
    return graphs
