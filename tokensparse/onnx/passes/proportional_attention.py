"""ToMe's proportional attention (Bolya et al., ICLR 2023) in ONNX: add log(size) to the attention
logits of every block after a merge, right before its Softmax."""

from __future__ import annotations

import onnx_ir as ir

from tokensparse.onnx.passes.context import OnnxPassContext
from tokensparse.onnx.passes.policy_graphs import size_bias_graph
from tokensparse.onnx.passes.splice import inline_graph


def proportional_attention_pass(model: ir.Model, ctx: OnnxPassContext) -> ir.Model:
    """ToMe's proportional attention (Bolya et al. 2023): Softmax(logits + log(size)) in blocks after a merge."""
    if not ctx.policy.sizes_bias_attention:
        return model
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
    return model
