"""Check an ONNX model against TensorRT's ONNX parser support (operators, attributes, TopK's K limit,
dynamic-shape rules) without TensorRT installed: the `--check-trt` report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tokensparse.deploy import trt_support
from tokensparse.deploy.plugin_nodes import KERNEL_PLUGINS, STEP_PLUGINS


_CHECKED = {"TopK", "ScatterElements", "Squeeze", "Unsqueeze", "CumSum", *trt_support.REDUCE_OPS}


@dataclass
class Finding:
    node: str
    op_type: str
    problem: str
    fatal: bool = True        # False: a warning (the engine may still build)


@dataclass
class TrtReport:
    path: str
    opset: int
    op_counts: Counter
    findings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(finding.fatal for finding in self.findings)

    def __str__(self) -> str:
        lines = [f"TensorRT {trt_support.TRT_VERSION} ONNX support check of {self.path} (opset {self.opset}): "
                 + ("compatible" if self.ok else "NOT compatible")]
        lines.append("  ops: " + ", ".join(f"{op} x{count}" for op, count in sorted(self.op_counts.items())))
        for finding in self.findings:
            kind = "error" if finding.fatal else "warning"
            lines.append(f"  {kind}: {finding.op_type} {finding.node!r}: {finding.problem}")
        noted = sorted(op for op in self.op_counts if trt_support.SUPPORTED.get(op) and op not in _CHECKED)
        lines += [f"  note: {op}: {trt_support.SUPPORTED[op]}" for op in noted]
        return "\n".join(lines)


def check_tensorrt(path_or_model) -> TrtReport:
    """Every node of the model against TensorRT's documented ONNX operator support."""
    import onnx

    model = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    path = path_or_model if isinstance(path_or_model, str) else "<model>"
    report = TrtReport(path, opset, Counter(node.op_type for node in model.graph.node))
    low, high = trt_support.OPSET_RANGE
    if not low <= opset <= high:
        report.findings.append(Finding("<model>", "opset", f"opset {opset} is outside TensorRT "
                                                           f"{trt_support.TRT_VERSION}'s range {low}..{high}"))
    constants = _constants(model)
    for node in model.graph.node:
        report.findings.extend(_check_node(node, constants))
    return report


def _check_node(node, constants: dict) -> list[Finding]:
    name = node.name or node.output[0]
    if node.domain == "tokensparse" and node.op_type in STEP_PLUGINS + KERNEL_PLUGINS:
        runs = ("an ahead-of-time kernel: the engine runs from C++" if node.op_type in KERNEL_PLUGINS else
                "its implementation runs from Python")
        return [Finding(name, node.op_type, f"tokensparse plugin node: register the plugin before building "
                                            f"(tokensparse.deploy.trt_plugins.register_plugins()); {runs}",
                        fatal=False)]
    if node.domain not in ("", "ai.onnx"):
        return [Finding(name, node.op_type, f"custom domain {node.domain!r}: needs a TensorRT plugin")]
    if node.op_type in trt_support.UNSUPPORTED:
        return [Finding(name, node.op_type, f"not supported: {trt_support.UNSUPPORTED[node.op_type]}")]
    if node.op_type not in trt_support.SUPPORTED:
        return [Finding(name, node.op_type, "not in TensorRT's ONNX operator list")]
    attributes = {a.name: a for a in node.attribute}
    findings = []
    if node.op_type == "TopK":
        k = constants.get(node.input[1])
        if k is None:
            findings.append(Finding(name, "TopK", f"K is computed at run time; TensorRT needs K <= "
                                                  f"{trt_support.TOPK_MAX_K} (a build-time constant is safest)",
                                    fatal=False))
        elif int(np.max(k)) >= trt_support.TOPK_MAX_K:
            findings.append(Finding(name, "TopK", f"K={int(np.max(k))} is not below TensorRT's limit of "
                                                  f"{trt_support.TOPK_MAX_K}: use the Triton top-k kernel"))
        if "sorted" in attributes and attributes["sorted"].i not in trt_support.TOPK_SORTED_VALUES:
            findings.append(Finding(name, "TopK", "sorted=0: TensorRT supports sorted=1 only"))
    if node.op_type == "ScatterElements" and "reduction" in attributes:
        reduction = attributes["reduction"].s.decode()
        if reduction not in trt_support.SCATTER_ELEMENTS_REDUCTIONS:
            findings.append(Finding(name, "ScatterElements", f"reduction={reduction!r} is not one of "
                                                             f"{sorted(trt_support.SCATTER_ELEMENTS_REDUCTIONS)}"))
        elif reduction != "none":
            findings.append(Finding(name, "ScatterElements", f"reduction={reduction!r} runs in TensorRT's "
                                                             f"scatterElements plugin (libnvinfer_plugin)", fatal=False))
    constant_input = _CONSTANT_INPUTS.get(node.op_type)
    if constant_input is not None and len(node.input) > constant_input and node.input[constant_input] \
            and node.input[constant_input] not in constants:
        findings.append(Finding(name, node.op_type, f"input {constant_input} is computed at run time: "
                                                    f"{trt_support.SUPPORTED[node.op_type]}"))
    return findings


# Inputs that TensorRT's parser needs at build time (their restriction notes say so).
_CONSTANT_INPUTS = {"Squeeze": 1, "Unsqueeze": 1, "CumSum": 1, **{op: 1 for op in trt_support.REDUCE_OPS}}


def _constants(model) -> dict:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.array(attribute.i if attribute.name == "value_int" else
                                                      list(attribute.ints))
    return values
