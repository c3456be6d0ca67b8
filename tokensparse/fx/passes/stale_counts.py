"""Refuse a cut whose traced token count the model also uses as a number after it: dynamo bakes
`x.shape[1]` into the graph as a literal (`h[:, 1:].sum(1) / (h.shape[1] - 1)` divides by 64), which the
cut would leave at the unpruned count."""

from __future__ import annotations

import operator
from typing import Iterator

import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.patterns.graph import op_name
from tokensparse.pipeline import MatchFailure
from tokensparse.runtime.ops import is_tokensparse_target

# Ops whose scalar arguments are values (operands, fill values, ranges, indices), never dims or shapes.
_ARITHMETIC = {"add", "sub", "mul", "truediv", "div", "floordiv", "floor_divide", "true_divide", "rsub", "pow",
               "mod", "remainder", "fmod", "__add__", "__sub__", "__mul__", "__truediv__", "__floordiv__",
               "__radd__", "__rsub__", "__rmul__", "__rtruediv__", "add_", "sub_", "mul_", "div_"}
_VALUE_ARGUMENTS = {                       # op -> positions of value arguments (None: every position)
    "full": (1,), "new_full": (2,), "full_like": (1,), "fill": (1,), "fill_": (1,), "masked_fill": (2,),
    "masked_fill_": (2,), "clamp": (1, 2), "clamp_min": (1,), "clamp_max": (1,), "arange": None,
    "linspace": (0, 1), "select": (2,), "narrow": (2, 3), "scalar_tensor": (0,), "tensor": (0,),
}
_VALUE_KEYWORDS = {"other", "fill_value", "value", "min", "max", "start", "end", "step", "alpha", "index",
                   "length"}


def stale_token_counts_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Refuse a node after a cut that takes the traced token count as a number."""
    # Fail (with the reason) when a node after a cut takes the traced token count, or the count less some of its
    # prefix tokens, as a number: the rewrite cannot tell it from an unrelated constant.
    if not ctx.blocks or not isinstance(ctx.blocks[0].tokens, int):
        return gm       # a symbolic count is a node of the graph, not a literal (not checked here)
    tokens = ctx.blocks[0].tokens
    stale = {tokens - removed: removed for removed in range(ctx.prefix_tokens + 1) if tokens - removed > 1}
    for node in _after_cuts(gm):
        for value in _values(node, tokens):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in stale:
                continue
            removed = stale[value]
            which = f"the {tokens} traced tokens" + (f" less {removed} prefix token{'s' * (removed > 1)}"
                                                      if removed else "")
            raise MatchFailure(f"{node.name} ({op_name(node)}) uses the number {value:g} after the cut, which is "
                               f"{which}: the model reads the token count as a value (dynamo bakes x.shape[1] "
                               f"into the graph), so it would keep the unpruned count there; compute such values "
                               f"from the tensor (h[:, 1:].mean(1)) to prune this model")
    return gm


def _after_cuts(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """The nodes that a policy step's output reaches."""
    reached: set = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_tokensparse_target(node.target):
            reached.add(node)
            continue
        inputs = node.all_input_nodes
        if any(source in reached for source in inputs):
            reached.add(node)
            if node.op != "output":
                yield node


def _values(node: fx.Node, tokens: int) -> Iterator[object]:
    """The scalar arguments of `node` that are values rather than dims or shapes."""
    name = op_name(node)
    if node.op == "call_function" and node.target is operator.getitem:
        yield from _index_values(node.args[1], tokens)
        return
    if name in _ARITHMETIC:
        positions = None
    elif name in _VALUE_ARGUMENTS:
        positions = _VALUE_ARGUMENTS[name]
    else:
        return
    for position, argument in enumerate(node.args):
        if positions is None or position in positions:
            yield argument
    for keyword, argument in node.kwargs.items():
        if keyword in _VALUE_KEYWORDS:
            yield argument


def _index_values(index, tokens: int) -> Iterator[object]:
    """Integer indices and slice bounds of a subscript (`h[:, 64]`, `h[:, 1:64]`); a slice's stop at the
    full count keeps its meaning after the cut (everything), so it is not one."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if isinstance(part, slice):
            yield part.start
            if part.stop != tokens:
                yield part.stop
        else:
            yield part
