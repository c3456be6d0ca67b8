"""ToMe's proportional attention (Bolya et al., ICLR 2023) in ONNX: add log(size) to the attention
logits of every block after a merge, right before its Softmax."""

from __future__ import annotations

import onnx_ir as ir

from tokensparse.export.onnx_passes.context import OnnxPassContext
from tokensparse.export.onnx_passes.policy_graphs import size_bias_graph
from tokensparse.export.onnx_passes.splice import inline_graph


def proportional_attention_pass(ctx: OnnxPassContext) -> None:
    """Softmax(logits) -> Softmax(logits + log(size)) in blocks that follow a merge."""
    if not ctx.policy.sizes_bias_attention:
        return
    size = None
    for block in ctx.blocks:
        if size is not None:
            softmax = block.attention.softmax
            anchor = softmax.inputs[0].producer()
            before = set(ctx.graph)
            [bias] = inline_graph(ctx.graph, size_bias_graph(ctx.tokens_in[block.index]), [size], anchor,
                                  f"tokensparse.size_bias{block.index}.")
            add = ir.Node("", "Add", [softmax.inputs[0], bias], name=f"tokensparse.size_bias{block.index}.add")
            ctx.graph.insert_before(softmax, add)
            softmax.replace_input_with(0, add.outputs[0])
            ctx.inserted |= set(ctx.graph) - before
        size = ctx.sizes_after.get(block.index, size)
