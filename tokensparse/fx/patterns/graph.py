"""Read-only helpers over FX graphs from dynamo (torch-level ops) and torch.export (aten ops)."""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx


def op_name(node: fx.Node) -> Optional[str]:
    """One name for an op whatever level it was traced at: 'add' for operator.add, torch.add,
    Tensor.add and aten.add.Tensor; 'scaled_dot_product_attention' for F.* and aten.*."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", None)


def is_op(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) in names


def meta_value(node: Any):
    if not isinstance(node, fx.Node):
        return node
    value = node.meta.get("val")
    return node.meta.get("example_value") if value is None else value


def shape_of(node: Any) -> Optional[tuple]:
    value = meta_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


_PREFIXES = re.compile(r"^(L\['self'\]\.?|L__self___|self\.)")


def module_paths(node: fx.Node) -> list[str]:
    """The module paths of nn_module_stack, outermost first, as 'blocks.3.attn'."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        paths.append(_PREFIXES.sub("", path))
    return paths


def arg(node: fx.Node, index: int, name: str, default=None):
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.update_kwarg(name, value)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if isinstance(meta_value(n), torch.Tensor)]


def downstream(start: Iterable[fx.Node], within: Optional[set] = None) -> set:
    """Every node reachable from `start` through users (optionally staying inside `within`)."""
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in seen and (within is None or user in within):
                seen.add(user)
                todo.append(user)
    return seen


def insert_call(graph: fx.Graph, before: fx.Node, fn, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """A call_function node placed right before `before` (so successive inserts keep their order)."""
    with graph.inserting_before(before):
        return graph.call_function(fn, args, kwargs or {})


def output_shapes(gm: fx.GraphModule) -> list:
    """Shapes of the graph's outputs from node meta (None for non-tensors), in output order."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    shapes = []
    fx.node.map_arg(output.args[0], lambda n: shapes.append(
        tuple(meta_value(n).shape) if isinstance(meta_value(n), torch.Tensor) else None))
    return shapes
