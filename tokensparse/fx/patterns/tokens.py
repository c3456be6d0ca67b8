"""Token layout: how many prefix tokens (CLS, distillation, registers) precede the patch tokens."""

from __future__ import annotations

import math

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_int

from tokensparse.fx.patterns.graph import is_op, shape_of, tensor_inputs
from tokensparse.pipeline import MatchFailure

_STREAM_OPS = ("add", "dropout", "layer_norm", "to", "contiguous", "clone", "mul", "_to_copy", "native_layer_norm")


def find_prefix_tokens(stream: fx.Node, tokens: int) -> int:
    """Prefix tokens = tokens entering the first block minus the patches of the patch embedding.

    The patch count comes from the spatial size of the last convolution upstream; the nearest
    concatenation along the token axis must end with the patches (so prefix tokens are in front)."""
    patches = _patch_count(stream)
    concat = _nearest_token_concat(stream, tokens)
    if patches is None:
        if concat is None:
            raise MatchFailure("no patch embedding (convolution) or token concatenation found before the "
                               "first block: pass prefix_tokens=")
        sizes = [shape_of(part)[1] for part in concat.args[0]]
        return sum(sizes[:-1])
    prefix = tokens - patches
    if prefix < 0:
        raise MatchFailure(f"{tokens} tokens enter the first block but the patch embedding makes {patches}: "
                           f"pass prefix_tokens=")
    if concat is not None and prefix > 0 and shape_of(concat.args[0][-1])[1] < patches:
        raise MatchFailure("tokens are concatenated after the patch tokens; only prefix tokens in front are "
                           "supported: pass prefix_tokens= if they are")
    return prefix


def _upstream(node: fx.Node, limit: int = 400):
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        current = todo.pop()
        for inp in current.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                todo.append(inp)
    return seen


def patch_grid(stream: fx.Node):
    """(rows, cols) of the patch embedding's convolution output, or None without a convolution."""
    convs = [n for n in _upstream(stream) if is_op(n, "conv2d", "convolution", "_convolution")]
    shape = shape_of(convs[0]) if convs else None
    if shape is None or len(shape) != 4:
        return None
    # Under dynamic shapes the grid may be symbolic while the token count is static: specialise it
    # with a guard (the graph is already specialised on the token count).
    return tuple(d if isinstance(d, int) else guard_int(d) for d in shape[2:])


def _patch_count(stream: fx.Node):
    grid = patch_grid(stream)
    return math.prod(grid) if grid is not None else None


def _nearest_token_concat(stream: fx.Node, tokens: int):
    node = stream
    for _ in range(30):
        if is_op(node, "cat", "concat", "concatenate"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim in (1, -2):
                return node
        same = [n for n in tensor_inputs(node) if shape_of(n) is not None and len(shape_of(n)) == 3
                and shape_of(n)[1] == tokens]
        if not is_op(node, *_STREAM_OPS) or not same:
            return None
        node = same[0]
    return None
