"""Capture a model's dynamo graphs without compiling them (for explain() and tests)."""

from __future__ import annotations

import torch


def capture_graphs(model, *args, **kwargs) -> list:
    """Run `model(*args, **kwargs)` under dynamo once and return [(GraphModule, example_inputs)]."""
    graphs = []

    def record(gm, example_inputs, **unused):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(model, backend=record, isolate_recompiles=True)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return graphs
