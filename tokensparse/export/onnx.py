"""tokensparse.export.to_onnx: torch.export, the tokensparse passes on the exported graph, then
torch.onnx.export with every policy step in standard ONNX ops (TopK, GatherElements, ScatterElements
with reduction), so that ONNX Runtime, TensorRT and OpenVINO run it without custom ops."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

from tokensparse.config import NO_FACTS, CallerFacts, Config, config_from_options
from tokensparse.export.lowering import DECOMPOSITIONS, KERNEL_PLUGIN_CODE, inline_policy_code
from tokensparse.pipeline import MatchFailure
from tokensparse.runtime.hf_model import is_generative
from tokensparse.runtime.ops import static_token_counts
from tokensparse.fx.rewrite import RewriteResult, rewrite_with_kv, warn_once, warnings_for

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


def export_pruned(model: torch.nn.Module, example_inputs, config, dynamic: bool = True,
                  plugins=False, shortest_prompt: Optional[int] = None, dynamic_shapes=None,
                  facts: CallerFacts = NO_FACTS) -> tuple[torch.export.ExportedProgram, RewriteResult]:
    """The model as an ExportedProgram with the config's policy built in: in plain aten ops, or with the
    ops that become plugin nodes (`plugins`: "step" or True, each policy step one tokensparse:: op; "kernel",
    each kernel one op, the rest in aten ops) kept whole (static token counts). `example_inputs` is
    a sequence of positional inputs or a dict of keyword inputs. `dynamic`: a dynamic batch axis;
    `shortest_prompt`: a dynamic prompt length from that many tokens up (axis 1 of the keyword inputs
    input_ids and attention_mask). `dynamic_shapes`, given, replaces both (the inputs are then traced as given).
    `facts`: what the caller does around the graph (the generation pair's decode masks, config.CallerFacts)."""
    from tokensparse.deploy.plugin_nodes import plugin_mode

    config = Config() if config is None else config_from_options(config)
    mode = plugin_mode(plugins)
    args, kwargs = example_call(model, example_inputs)
    if dynamic and dynamic_shapes is None:
        args, kwargs = _batch_of_two(args), dict(zip(kwargs, _batch_of_two(kwargs.values())))
    if dynamic_shapes is None and (dynamic or shortest_prompt):
        dynamic_shapes = _dynamic_axes(args, kwargs, dynamic, shortest_prompt)
    exported = _export(model, args, kwargs, dynamic_shapes)
    graph = exported.module()
    fakes = [node.meta["val"] for node in graph.graph.find_nodes(op="placeholder")]
    with warnings_for(model):
        result = rewrite_with_kv(graph, fakes, config, facts)
    if not result.changed:
        return exported.run_decompositions(DECOMPOSITIONS), result
    try:
        lowered = inline_policy_code(result.gm, plugin_ops() if mode == "step" else frozenset(),
                                     KERNEL_PLUGIN_CODE if mode == "kernel" else None)
        with static_token_counts():
            pruned = _export(lowered, args, kwargs, _flat_for(lowered, args, dynamic_shapes))
    except Exception as error:  # noqa: BLE001 - the unpruned export is correct; say why pruning is missing
        reason = error.reason if isinstance(error, MatchFailure) else (
            f"re-exporting the rewritten graph failed ({type(error).__name__}: {str(error).splitlines()[0]})")
        with warnings_for(model):
            warn_once(reason, consequence="exporting the model unpruned")
        return exported.run_decompositions(DECOMPOSITIONS), RewriteResult(graph, False, reason, result.match)
    return pruned.run_decompositions(DECOMPOSITIONS), result


def to_onnx(model: torch.nn.Module, example_inputs, config, path: str, dynamic: bool = True,
            opset: int = DEFAULT_OPSET, plugins=False) -> OnnxExport:
    """Export `model` with `config` (a Config or options dict) to the ONNX file `path`. `example_inputs` is
    a sequence of positional inputs or a dict of keyword inputs (a Hugging Face VLM's input_ids and
    pixel_values; generative models export their prefill logits, without a KV cache). `dynamic` makes the
    batch axis of every input dynamic; `plugins` writes TensorRT plugin nodes (domain "tokensparse")
    instead of standard operators: "step" (or True) one per policy step, run from Python; "kernel" one per
    Triton kernel, with ahead-of-time implementations that run from C++ (plugin_nodes.py). Returns what was
    written and whether pruning is built in."""
    from tokensparse.deploy.plugin_nodes import plugin_mode, plugin_translations
    from tokensparse.export.translations import TRANSLATIONS

    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset={opset!r} is out of range: torch.onnx's exporter needs opset >= 18")
    config = Config() if config is None else config_from_options(config)
    mode = plugin_mode(plugins)
    if config.kv is not None:
        with warnings_for(model):
            warn_once(f"kv={config.kv.name} is not exported: the ONNX computes the prefill without a KV cache, which "
                      f"eviction does not change", consequence="exporting the rest of the config")
        config = dataclasses.replace(config, kv=None)
    program, result = export_pruned(model, example_inputs, config, dynamic, mode)
    translations = {**TRANSLATIONS, **plugin_translations(mode)}
    args, kwargs = example_call(model, example_inputs)
    onnx_program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                     optimize=True, verbose=False, custom_translation_table=translations,
                                     output_names=output_names(program))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    onnx_program.save(path)
    graph = onnx_program.model.graph
    return OnnxExport(path, onnx_program, result.changed, result.reason,
                      [value.name for value in graph.inputs], [value.name for value in graph.outputs])


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """Names for the exported outputs from the model's own output structure: "logits" and
    "image_hidden_states" for a ModelOutput, "output" for a lone tensor, "output_0", ... for a tuple."""
    spec = program.call_spec.out_spec
    leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    names = [re.sub(r"\W+", "_", pytree.keystr(path)).strip("_") for path, _ in leaves]
    names = [name if not name.isdigit() else f"output_{name}" for name in names]
    if len(set(names)) != len(names) or not all(names):
        return ["output"] if len(names) == 1 else [f"output_{index}" for index in range(len(names))]
    return names


def plugin_ops() -> frozenset:
    """The tokensparse ops that plugins=True writes as TensorRT plugin nodes; the others become standard ops."""
    from tokensparse.deploy.plugin_nodes import PLUGIN_TRANSLATIONS

    return frozenset(PLUGIN_TRANSLATIONS)


def example_call(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict]:
    """(args, kwargs) of the exported call. A generative Hugging Face model is exported without its KV
    cache (use_cache=False): the export computes the prefill's logits."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(f"example_inputs is a {type(example_inputs).__name__}: give a tuple of positional "
                        f"inputs or a dict of keyword inputs")
    if is_generative(model):
        kwargs.setdefault("use_cache", False)
    return args, kwargs


def _export(model, args, kwargs, dynamic_shapes) -> torch.export.ExportedProgram:
    """torch.export. A dynamic prompt length whose range the graph narrows (a KV budget's branch: prompts longer
    than the budget) is narrowed once as torch.export suggests; the range is in the program (prompt_lengths)."""
    for _ in range(4):      # each narrowing can expose the next guard (6 <= length, then budget < length)
        try:
            return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except torch._dynamo.exc.UserError as error:
            if dynamic_shapes is None or error.error_type is not torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
                raise
            violated = re.match(r"Constraints violated \(([^)]*)\)", str(error))
            if not (violated and violated.group(1) == "sequence" and "sequence = Dim(" in str(error)):
                _raise_constraint_violation(model, error)
            dynamic_shapes = refine_dynamic_shapes_from_suggested_fixes(error.msg, dynamic_shapes)
    return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _flat_for(graph_module, args, dynamic_shapes):
    """The dynamic shapes of positional inputs that include varargs (a tuple of tensors), flattened to match a
    rewritten GraphModule, which takes every tensor as its own argument."""
    placeholders = len(graph_module.graph.find_nodes(op="placeholder"))
    if not isinstance(dynamic_shapes, tuple) or not args or placeholders == len(dynamic_shapes):
        return dynamic_shapes
    return tuple(pytree.tree_leaves(dynamic_shapes, is_leaf=lambda spec: spec is None or isinstance(spec, dict)))


def _raise_constraint_violation(model, error):
    """A batch axis that the model fixes while traced (LLaVA), said plainly; any other violation as it is."""
    if "batch" in str(error).split("!")[0]:
        raise ValueError(f"{type(model).__name__} fixes the batch size while it is traced, so it cannot be "
                         f"exported with a dynamic batch axis: export with dynamic=False (tokensparse export "
                         f"--static) and one example batch per batch size") from error
    raise error


def prompt_lengths(program: torch.export.ExportedProgram, name: str = "input_ids") -> tuple[int, int] | None:
    """(shortest, longest) prompt the program takes when its input `name` has a dynamic axis 1, else None."""
    node = next((node for node in program.graph.find_nodes(op="placeholder") if node.name == name), None)
    if node is None or "val" not in node.meta:
        return None
    size = node.meta["val"].shape[1]
    if not isinstance(size, torch.SymInt):
        return None
    bounds = program.range_constraints[size.node.expr]
    return int(bounds.lower), int(bounds.upper) if bounds.upper.is_finite else None


def _batch_of_two(inputs) -> tuple:
    """torch.export specialises a dimension of size 1: trace a dynamic batch with two samples."""
    return tuple(x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in inputs)


TOKEN_INPUTS = ("input_ids", "attention_mask")       # keyword inputs whose axis 1 is the prompt's tokens


def _dynamic_axes(args, kwargs, batch_axis: bool, shortest_prompt: Optional[int]):
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=max(2, shortest_prompt or 2), max=1 << 20)

    def axes(x, name=None):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        chosen = {0: batch} if batch_axis else {}
        if shortest_prompt and name in TOKEN_INPUTS and x.dim() >= 2:
            chosen[1] = sequence
        return chosen or None

    positional = tuple(axes(x) for x in args)
    keyword = {name: axes(x, name) for name, x in kwargs.items()}
    return keyword if not args else positional if not kwargs else positional + tuple(keyword.values())
