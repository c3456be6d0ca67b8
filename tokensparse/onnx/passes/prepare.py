"""Bring an ONNX file as exporters write it to the form the passes match, on an in-memory copy: opset 18
(onnx's version converter), static sizes annotated where the exporter left them symbolic (ONNX Runtime's
symbolic shape inference), no Casts to the type a value already has."""

from __future__ import annotations

import logging
import re

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass

from tokensparse.pipeline import MatchFailure

log = logging.getLogger(__name__)

TARGET_OPSET = 18      # the policy graphs are exported at this opset and spliced in as they are


def default_opset(proto: onnx.ModelProto) -> int:
    return max((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), default=0)


def upgrade_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`proto` converted to TARGET_OPSET when older (a new proto; `proto` is left as it is), or a
    MatchFailure saying why it cannot be."""
    opset = default_opset(proto)
    if opset >= TARGET_OPSET:
        return proto, []
    if opset == 0:
        raise MatchFailure("the model imports no ai.onnx opset")
    try:
        upgraded = onnx.version_converter.convert_version(proto, TARGET_OPSET)
    except Exception as error:  # noqa: BLE001 - the converter raises RuntimeError/IndexError/... by op
        raise MatchFailure(f"the model uses opset {opset}; onnx's version converter could not upgrade it to "
                           f"{TARGET_OPSET}{_undefined_ops(proto)}: {_converter_message(error)}") from error
    try:
        onnx.checker.check_model(upgraded)
    except onnx.checker.ValidationError as error:
        raise MatchFailure(f"the model uses opset {opset}; onnx's version converter upgraded it to {TARGET_OPSET} "
                           f"but the result is not valid{_undefined_ops(proto)}: {str(error).splitlines()[0]}") \
            from error
    log.debug("upgraded from opset %d to %d", opset, TARGET_OPSET)
    return upgraded, [f"upgraded from opset {opset} to {TARGET_OPSET} with onnx's version converter (in memory; the "
                      f"rewritten model is written at opset {TARGET_OPSET})"]


def _undefined_ops(proto: onnx.ModelProto) -> str:
    """' (it uses ImageScaler, which ONNX does not define at opset 18)': the ops removed or deprecated."""
    gone = sorted({node.op_type for node in proto.graph.node if node.domain in ("", "ai.onnx")
                   and not _defined_at(node.op_type, TARGET_OPSET)})
    return f" (it uses {', '.join(gone)}, which ONNX does not define at opset {TARGET_OPSET})" if gone else ""


def _defined_at(op_type: str, opset: int) -> bool:
    try:
        return not onnx.defs.get_schema(op_type, opset, "").deprecated
    except onnx.defs.SchemaError:
        return False


def _converter_message(error: Exception) -> str:
    """The converter's message without its C++ source location and assertion text."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "has no registered schema" in text:      # onnx leaves this one unformatted ("Op '%s' ... %lld.Crop918")
        return "an op has no registered schema at the target opset"
    return re.sub(r"^\S+\.cc:\d+: \w+: Assertion `.*?` failed: ", "", text)


def infer_shapes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`proto` with every value's shape annotated: onnx's shape inference with data propagation, then ONNX
    Runtime's symbolic shape inference where that leaves sizes unknown (the TorchScript-based exporter
    computes Reshape targets from Shape ops, which onnx's inference cannot follow through a -1)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - the model is valid; the passes say which shape they miss
        inferred = proto
    unknown = _values_without_static_shape(inferred)
    if not unknown:
        return inferred, []
    try:
        symbolic = _symbolic_shapes(proto)
    except Exception as error:  # noqa: BLE001 - keep onnx's shapes; the passes say which shape they miss
        return inferred, [f"ONNX Runtime's symbolic shape inference failed ({type(error).__name__}: "
                          f"{str(error)[:200]}); {len(unknown)} value(s) keep unknown sizes"]
    left = _values_without_static_shape(symbolic)
    log.debug("symbolic shape inference: %d value(s) with unknown sizes before, %d after", len(unknown), len(left))
    if len(left) >= len(unknown):
        return inferred, [f"ONNX Runtime's symbolic shape inference left {len(left)} value(s) with unknown sizes "
                          f"(onnx's {len(unknown)}); onnx's shapes kept"]
    return symbolic, [f"sizes inferred with ONNX Runtime's symbolic shape inference ({len(unknown)} value(s) had "
                      f"unknown sizes after onnx's, {len(left)} after)"]


def _symbolic_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """SymbolicShapeInference.infer_shapes' own loop, keeping what it inferred when it cannot infer every
    value: the library's entry point then saves sym_shape_infer_temp.onnx into the working directory and
    raises."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=False, guess_output_rank=False, verbose=0)
    inference._preprocess(proto)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


def _values_without_static_shape(proto: onnx.ModelProto) -> list[str]:
    """Main-graph tensor values with no shape, or a size that is neither a number nor a named symbol
    (onnx names the sizes it could not infer unk__N)."""
    known = {value.name: value for value in list(proto.graph.value_info) + list(proto.graph.output)
             + list(proto.graph.input)}
    initializers = {tensor.name for tensor in proto.graph.initializer}
    missing = []
    for node in proto.graph.node:
        for name in node.output:
            if not name or name in initializers:
                continue
            value = known.get(name)
            if value is None or not value.type.HasField("tensor_type"):
                if value is None or not value.type.HasField("sequence_type"):
                    missing.append(name)
                continue
            tensor = value.type.tensor_type
            if not tensor.HasField("shape") or any(
                    not dim.HasField("dim_value") and (not dim.dim_param or dim.dim_param.startswith("unk__"))
                    for dim in tensor.shape.dim):
                missing.append(name)
    return missing


def drop_no_op_casts(model: ir.Model) -> list[str]:
    """Remove Casts to the type their input already has (the TorchScript-based exporter writes two after
    each eager attention's Softmax), so the attention pattern sees Softmax -> MatMul."""
    from onnxscript.rewriter import RewritePass
    from onnxscript.rewriter.rules.common import no_op_cast_rule

    casts = sum(node.op_type == "Cast" for node in model.graph)
    RewritePass([no_op_cast_rule])(model)
    IdentityEliminationPass()(model)
    dropped = casts - sum(node.op_type == "Cast" for node in model.graph)
    if not dropped:
        return []
    log.debug("dropped %d no-op Cast(s)", dropped)
    return [f"dropped {dropped} Cast(s) to the type their input already had"]
