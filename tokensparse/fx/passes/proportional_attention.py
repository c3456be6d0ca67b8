"""ToMe's proportional attention: add log(size) of each key to the attention logits
(Bolya et al., ICLR 2023), as an additive SDPA mask so fused attention stays fused."""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.patterns.graph import arg, insert_call, set_arg
from tokensparse.policies.tome import size_bias


def mask_with_size_bias(mask, size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Combine an existing SDPA mask (None, bool or additive) with the log-size bias."""
    bias = size_bias(size).to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)
    return mask + bias


def proportional_attention_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """ToMe's proportional attention (Bolya et al. 2023): + log(size) after the first merge."""
    # Bias every attention after the first merge with log(size) of its keys.
    if not ctx.policy.sizes_bias_attention:
        return gm
    for block in ctx.blocks:
        size = ctx.size_nodes.get(block.index)
        if size is None:
            continue
        site = block.site
        dtype = site.q.meta.get("val", site.q.meta.get("example_value")).dtype
        if site.kind == "sdpa":
            mask = insert_call(gm.graph, site.node, mask_with_size_bias, (arg(site.node, 3, "attn_mask"), size, dtype))
            set_arg(site.node, 3, "attn_mask", mask)
        else:
            logits = site.node.args[0]
            bias = insert_call(gm.graph, site.node, mask_with_size_bias, (None, size, dtype))
            biased = insert_call(gm.graph, site.node, operator.add, (logits, bias))
            site.node.replace_input_with(logits, biased)
        ctx.record("proportional_attention", f"{block.path}: attention logits + log(size)")
    return gm
