"""Downstream of the first cut, token-dependent sizes baked into the graph must follow the new counts:
Reshape targets that copy the token count become 0 ("copy this input dimension"); masks that let
everything through are dropped from later blocks; any other token-sized tensor computed before the cut
and used after it makes the rewrite refuse, with the reason."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensparse.onnx.passes.context import OnnxPassContext
from tokensparse.pipeline import MatchFailure

_SIZE_INPUTS = {"Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Range": 1}


def token_sizes_pass(model: ir.Model, ctx: OnnxPassContext) -> ir.Model:
    """Re-derive Reshape targets, drop all-pass masks after the cut, refuse other baked token counts."""
    positions = ctx.positions()
    cut = positions[ctx.first_cut]
    for block in ctx.blocks:
        add = block.attention.mask_add
        if add is not None and positions[add] > cut and _lets_everything_through(add.inputs[1]):
            ctx.redirect_uses(add.outputs[0], add.inputs[0], keep=set())
            ctx.notes.append(f"block {block.index}: its attention mask lets every token through; dropped after "
                             f"the cut")
    RemoveUnusedNodesPass()(model)
    positions = ctx.positions()
    for node in list(ctx.graph):
        if node in ctx.inserted or positions.get(node, -1) <= cut:
            continue
        if node.op_type == "Reshape":
            _rederive_reshape(ctx, node)
        elif node.op_type in _SIZE_INPUTS:
            value = _constant(node.inputs[_SIZE_INPUTS[node.op_type]])
            if value is not None and ctx.tokens in value.tolist():
                raise MatchFailure(f"{node.op_type} {node.name!r} after the cut has the token count {ctx.tokens} "
                                   f"baked into {value.tolist()}")
        for value in node.inputs:
            if value is None or value.const_value is not None or _constant(value) is not None:
                continue
            producer = value.producer()
            produced_before = producer is None or positions.get(producer, -1) <= cut
            if produced_before and value.shape is not None and ctx.tokens in list(value.shape) \
                    and value not in ctx.graph.inputs:
                raise MatchFailure(f"{value.name!r} {list(value.shape)} is computed before the cut and used after "
                                   f"it by {node.op_type} {node.name!r}; it would have to follow the kept tokens")
    return model


def _rederive_reshape(ctx: OnnxPassContext, node: ir.Node) -> None:
    target = _constant(node.inputs[1])
    if target is None or ctx.tokens not in target.tolist():
        return
    source = node.inputs[0].shape
    new = target.copy()
    for index, size in enumerate(target.tolist()):
        if size != ctx.tokens:
            continue
        if source is None or index >= len(source) or source[index] != ctx.tokens:
            raise MatchFailure(f"Reshape {node.name!r} to {target.tolist()}: the token count at position {index} "
                               f"does not copy the same input dimension, so it cannot be re-derived")
        new[index] = 0
    allowzero = node.attributes.get("allowzero")
    if allowzero is not None and allowzero.value == 1:
        # torch.onnx writes allowzero=1; with no 0 in the target it means the same as allowzero=0.
        if 0 in target.tolist():
            raise MatchFailure(f"Reshape {node.name!r} to {target.tolist()} has allowzero=1 and a 0 size, so 0 "
                               f"cannot mean 'copy'")
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    value = ir.Value(name=f"tokensparse.shape.{node.name}", shape=ir.Shape([len(new)]),
                     type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(new.astype(np.int64)))
    ctx.graph.register_initializer(value)
    node.replace_input_with(1, value)


def _constant(value):
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


_PASS_THROUGH = ("Expand", "Cast", "Unsqueeze", "Identity", "Reshape")


def _through_broadcasts(value: ir.Value) -> ir.Value:
    """The value behind any chain of ops that only broadcast, reshape or cast it (all-zero and all-true
    survive them)."""
    producer = value.producer()
    while producer is not None and producer.op_type in _PASS_THROUGH:
        value = producer.inputs[0]
        producer = value.producer()
    return value


def _lets_everything_through(mask: ir.Value) -> bool:
    """An additive mask that is zero everywhere: a zero constant, or Where over a constant condition that
    picks a zero branch, through Expand/Cast/Unsqueeze/Identity/Reshape."""
    if _is_zero(mask):
        return True
    producer = _through_broadcasts(mask).producer()
    if producer is None or producer.op_type != "Where":
        return False
    truth = _truth(producer.inputs[0])
    return (truth is True and _is_zero(producer.inputs[1])) or (truth is False and _is_zero(producer.inputs[2]))


def _truth(value: ir.Value):
    """True when every element is true, False when every element is false, else None."""
    value = _through_broadcasts(value)
    constant = _constant(value)
    if constant is not None:
        return True if np.all(constant) else False if not np.any(constant) else None
    producer = value.producer()
    if producer is not None and producer.op_type == "Not":
        inner = _truth(producer.inputs[0])
        return None if inner is None else not inner
    return None


def _is_zero(value: ir.Value) -> bool:
    value = _through_broadcasts(value)
    constant = _constant(value)
    if constant is not None:
        return bool(np.all(constant == 0))
    producer = value.producer()
    if producer is not None and producer.op_type == "ConstantOfShape":
        fill = producer.attributes.get("value")
        return fill is None or bool(np.all(fill.value.numpy() == 0))
    return False
