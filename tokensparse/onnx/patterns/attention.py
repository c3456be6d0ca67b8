"""Attention in exported ONNX graphs, matched with onnxscript's pattern matcher: MatMul(Q, K^T), an
optional Mul/Div by the scale, an optional additive mask, Softmax, the optional Where(IsNaN) guard that
torch.onnx adds, then MatMul with V."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import onnx_ir as ir
from onnxscript.rewriter import pattern


@dataclass
class OnnxAttention:
    """One matched attention: its values and nodes."""

    output_node: ir.Node            # MatMul(probabilities, V)
    softmax: ir.Node
    query: ir.Value                 # [B, H, N, d] (possibly pre-scaled)
    keys_t: ir.Value                # [B, H, d, N] (possibly pre-scaled)
    probabilities: ir.Value         # [B, H, N, N], after the NaN guard when there is one
    mask_add: Optional[ir.Node]     # Add(scores, mask), when masked

    @property
    def output(self) -> ir.Value:
        return self.output_node.outputs[0]


def _make_pattern(scale_op: Optional[str], masked: bool, guarded: bool):
    def attention(op, query, keys_t, value, scale, mask, zero):
        scores = op.MatMul(query, keys_t, _outputs=["scores"])
        if scale_op is not None:
            scores = getattr(op, scale_op)(scores, scale)
        if masked:
            scores = op.Add(scores, mask, _outputs=["masked"])
        probabilities = op.Softmax(scores, _outputs=["probabilities"])
        if guarded:
            probabilities = op.Where(op.IsNaN(probabilities), zero, probabilities, _outputs=["guarded"])
        return op.MatMul(probabilities, value)

    name = f"attention(scale={scale_op}, mask={masked}, nan_guard={guarded})"
    return pattern.Pattern(attention, name=name)


PATTERNS = [_make_pattern(scale, masked, guarded)
            for scale, masked, guarded in itertools.product((None, "Mul", "Div"), (True, False), (True, False))]


def find_attention(model: ir.Model) -> tuple[list[OnnxAttention], list[str]]:
    """Every attention in the main graph, in graph order, and why each unmatched Softmax did not match."""
    graph = model.graph
    found: list[OnnxAttention] = []
    matched_softmax = set()
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        for candidate in PATTERNS:
            match = candidate.match(model, graph, node, check_nodes_are_removable=False)
            if match:
                found.append(_attention_from(match, node))
                matched_softmax.add(found[-1].softmax)
                break
    notes = [f"Softmax {node.name!r}: not an attention (expected MatMul(Q, K^T) [Mul|Div scale] [Add mask] "
             f"-> Softmax [Where(IsNaN)] -> MatMul(., V))"
             for node in graph if node.op_type == "Softmax" and node not in matched_softmax]
    return found, notes


def _attention_from(match, output_node: ir.Node) -> OnnxAttention:
    bindings = match.bindings
    probabilities = bindings.get("guarded") or bindings["probabilities"]
    masked = bindings.get("masked")
    return OnnxAttention(output_node, bindings["probabilities"].producer(), bindings["query"],
                         bindings["keys_t"], probabilities, masked.producer() if masked is not None else None)
