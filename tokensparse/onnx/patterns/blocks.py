"""Transformer blocks of an ONNX graph: for each attention, the residual Add that joins its output back
into the token stream, the stream entering the block, and the token count; plus the prefix tokens."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from tokensparse.onnx.patterns.attention import OnnxAttention
from tokensparse.pipeline import MatchFailure

# Ops allowed between the attention output and the residual Add (head merge, projection, bias, scale).
_PROJECTION_OPS = {"Transpose", "Reshape", "MatMul", "Gemm", "Add", "Mul", "Identity", "Dropout", "Flatten"}
_MAX_STEPS = 12


@dataclass
class OnnxBlock:
    index: int
    attention: OnnxAttention
    stream: ir.Value               # [B, N, D] entering the block
    residual_add: ir.Node          # stream + attention branch
    tokens: int

    @property
    def residual(self) -> ir.Value:
        return self.residual_add.outputs[0]


def find_blocks(attentions: list[OnnxAttention]) -> tuple[list[OnnxBlock], list[str]]:
    """The block stack: one block per attention from the first on, while they see the same token count;
    attentions after the stack (a pooling head's) are left alone, with a note saying why."""
    blocks: list[OnnxBlock] = []
    notes: list[str] = []
    for index, attention in enumerate(attentions):
        try:
            residual_add, stream = _residual_add(attention)
            shape = stream.shape
            if shape is None or len(shape) != 3 or not isinstance(shape[1], int):
                raise MatchFailure(f"the stream {stream.name!r} entering it has shape {shape}; [batch, tokens, "
                                   f"channels] with a static token count is needed")
            if blocks and shape[1] != blocks[0].tokens:
                raise MatchFailure(f"it sees {shape[1]} tokens, the blocks before it {blocks[0].tokens}")
        except MatchFailure as failure:
            if not blocks:
                raise MatchFailure(f"attention {attention.output_node.name!r}: {failure.reason}") from None
            notes += [f"attention {later.output_node.name!r} after the block stack left unchanged"
                      + (f": {failure.reason}" if later is attention else "") for later in attentions[index:]]
            break
        blocks.append(OnnxBlock(index, attention, stream, residual_add, shape[1]))
    return blocks, notes


def _residual_add(attention: OnnxAttention) -> tuple[ir.Node, ir.Value]:
    frontier = [attention.output]
    branch = set()
    for _ in range(_MAX_STEPS):
        following = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node.op_type == "Add" and all(inp is not None and inp.const_value is None
                                                  and not _is_initializer(inp) for inp in node.inputs):
                    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
                    if other not in branch and other is not value and _same_shape(other, node.outputs[0]):
                        return node, other
                if node.op_type in _PROJECTION_OPS:
                    branch.update(node.outputs)
                    following.extend(node.outputs)
        frontier = following
        if not frontier:
            break
    raise MatchFailure(f"attention {attention.output_node.name!r}: no residual Add of the block input and "
                       f"the attention branch within {_MAX_STEPS} nodes")


def _is_initializer(value: ir.Value) -> bool:
    return value.is_initializer() if hasattr(value, "is_initializer") else value.const_value is not None


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def find_prefix_tokens(graph: ir.Graph, tokens: int) -> int:
    """Tokens entering the first block minus the patch grid of the (last) Conv before the blocks."""
    grids = [node.outputs[0].shape for node in graph if node.op_type == "Conv"]
    grids = [shape for shape in grids if shape is not None and len(shape) == 4
             and all(isinstance(d, int) for d in shape[2:])]
    if not grids:
        raise MatchFailure("no patch-embedding Conv with a static grid found: give prefix_tokens explicitly")
    patches = grids[0][2] * grids[0][3]
    if not 0 <= tokens - patches < tokens:
        raise MatchFailure(f"{tokens} tokens enter the first block but the patch grid holds {patches}: give "
                           f"prefix_tokens explicitly")
    return tokens - patches
