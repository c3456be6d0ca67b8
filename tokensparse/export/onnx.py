"""tokensparse.export.to_onnx: torch.export, the tokensparse passes on the exported graph, then
torch.onnx.export with every policy step in standard ONNX ops (TopK, GatherElements, ScatterElements
with reduction), so that ONNX Runtime, TensorRT and OpenVINO run it without custom ops."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from tokensparse.config import Config, config_from_options
from tokensparse.export.lowering import DECOMPOSITIONS, inline_policy_code, keep_views_as_reshapes
from tokensparse.runtime.ops import static_token_counts
from tokensparse.rewrite import RewriteResult, rewrite_graph, warn_once

DEFAULT_OPSET = 18


@dataclass
class OnnxExport:
    """What to_onnx wrote and what the rewrite did."""

    path: str
    program: object                     # torch.onnx.ONNXProgram
    changed: bool                       # False: exported unpruned (reason says why)
    reason: Optional[str] = None
    input_names: list = field(default_factory=list)
    output_names: list = field(default_factory=list)


def export_pruned(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], config,
                  dynamic: bool = True, plugins: bool = False) -> tuple[torch.export.ExportedProgram, RewriteResult]:
    """The model as an ExportedProgram with the config's policy built in: in plain aten ops, or with
    `plugins` keeping each policy step as one tokensparse:: op (static token counts)."""
    config = Config() if config is None else config_from_options(config)
    inputs = _batch_of_two(example_inputs) if dynamic else tuple(example_inputs)
    dynamic_shapes = _batch_axes(inputs) if dynamic else None
    exported = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    graph = exported.module()
    fakes = [node.meta["val"] for node in graph.graph.find_nodes(op="placeholder")]
    result = rewrite_graph(graph, fakes, config)
    if not result.changed:
        return exported.run_decompositions(DECOMPOSITIONS), result
    lowered = keep_views_as_reshapes(result.gm) if plugins else inline_policy_code(result.gm)
    try:
        with static_token_counts():
            pruned = torch.export.export(lowered, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:  # noqa: BLE001 - the unpruned export is correct; say why pruning is missing
        reason = f"re-exporting the rewritten graph failed ({type(error).__name__}: {str(error).splitlines()[0]})"
        warn_once(reason)
        return exported.run_decompositions(DECOMPOSITIONS), RewriteResult(graph, False, reason, result.match)
    return pruned.run_decompositions(DECOMPOSITIONS), result


def to_onnx(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], config, path: str,
            dynamic: bool = True, opset: int = DEFAULT_OPSET, plugins: bool = False) -> OnnxExport:
    """Export `model` with `config` (a Config or options dict) to the ONNX file `path`; `dynamic` makes
    the batch axis of every input dynamic; `plugins` writes each policy step as one TensorRT plugin node
    (domain "tokensparse") instead of standard operators. Returns what was written and whether pruning
    is built in."""
    from tokensparse.export.plugin_nodes import PLUGIN_TRANSLATIONS
    from tokensparse.export.translations import TRANSLATIONS

    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset={opset!r} is out of range: torch.onnx's exporter needs opset >= 18")
    config = Config() if config is None else config_from_options(config)
    program, result = export_pruned(model, example_inputs, config, dynamic, plugins)
    translations = {**TRANSLATIONS, **PLUGIN_TRANSLATIONS} if plugins else TRANSLATIONS
    onnx_program = torch.onnx.export(program, tuple(example_inputs), dynamo=True, opset_version=opset,
                                     optimize=True, verbose=False, custom_translation_table=translations)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    onnx_program.save(path)
    graph = onnx_program.model.graph
    return OnnxExport(path, onnx_program, result.changed, result.reason,
                      [value.name for value in graph.inputs], [value.name for value in graph.outputs])


def _batch_of_two(example_inputs) -> tuple:
    """torch.export specialises a dimension of size 1: trace a dynamic batch with two samples."""
    return tuple(x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in example_inputs)


def _batch_axes(inputs) -> tuple:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
