"""Capture a model's dynamo graphs without compiling them (for explain() and tests)."""

from __future__ import annotations

import functools
import inspect

import torch

from tokensparse.scalar_outputs import ScalarOutputs

# torch >= 2.14: the capture's graphs stay apart from the model's other compiled code (its own recompile
# count). Older torch captures without it.
ISOLATED_RECOMPILES = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def capture_graphs(model, *args, **kwargs) -> list:
    """Run `model(*args, **kwargs)` under dynamo once and return [(GraphModule, example_inputs)]."""
    from tokensparse.runtime.hf_model import install_output_hooks

    graphs, record = _recorder()
    install_output_hooks(model)
    # dynamic=False: the graphs of these inputs' shapes, also after captures with other shapes (which would make
    # dynamo's automatic dynamic shapes trace symbolic sizes that a report cannot run or count).
    compiled = torch.compile(model, backend=record, dynamic=False, **ISOLATED_RECOMPILES)
    with torch.no_grad():       # the graphs tokensparse.compile would see
        ScalarOutputs()(compiled, *args, **kwargs)
    return graphs


def capture_prefill_graphs(model, inputs: dict) -> list:
    """The graphs of the prefill that `model.generate(**inputs)` runs, as [(GraphModule, example_inputs)]:
    for models whose generate() prepares what forward reads (Qwen2-VL: the vision tower's features and the
    3-D M-RoPE positions, which forward alone computes with graph breaks between the merge and the layers)."""
    from tokensparse.runtime.hf_model import install_output_hooks
    from tokensparse.runtime.model_copy import own_copy

    graphs, record = _recorder()
    install_output_hooks(model)
    prefill = own_copy(model)
    prefill.forward = torch.compile(type(model).forward.__get__(prefill), backend=record, dynamic=False,
                                    **ISOLATED_RECOMPILES)
    scalar_outputs = ScalarOutputs()
    forward = prefill.forward
    prefill.forward = functools.wraps(forward)(lambda *args, **kwargs: scalar_outputs(forward, *args, **kwargs))
    with torch.no_grad():
        prefill.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return graphs


def _recorder():
    """([], a dynamo backend that appends (GraphModule, example_inputs) to that list and runs the graph as is)."""
    graphs = []

    def record(gm, example_inputs, **unused):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    return graphs, record
