"""Decode steps into a StaticCache that a language-model policy (FastV, Chen et al., ECCV 2024, and the others
of passes/prune_sequence.py) pruned at prefill: each attention sees its layer's filled slots up to its own,
since a pruned layer's slots no longer equal positions and generate() masks by position."""

from __future__ import annotations

import torch.fx as fx

from tokensparse.passes.context import PassContext
from tokensparse.patterns.graph import MatchFailure, insert_call, set_arg
from tokensparse.patterns.kv_cache import find_cache_sites
from tokensparse.runtime.static_cache import slot_causal_mask


def static_slot_masks_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace every StaticCache decode attention's mask by slot_causal_mask over its layer's buffer."""
    sites = [site for site in find_cache_sites(gm) if site.static is not None and not site.static.created]
    if not sites:
        raise MatchFailure("no StaticCache decode step in this graph")
    for site in sites:
        attend_over_filled_slots(gm.graph, site.attention.node, site.static.slots, site.static.keys)
        ctx.acted_blocks.append(site.path)
        ctx.record("static_slot_masks", f"{site.path}: attends over its StaticCache's filled slots")
    return gm


def attend_over_filled_slots(graph: fx.Graph, attention: fx.Node, slots, buffer: fx.Node) -> None:
    """Give a StaticCache attention the mask slot_causal_mask(slots, buffer): each query, written at its slot,
    sees the buffer's filled slots up to its own (slots and positions differ once a cache is pruned or evicted)."""
    set_arg(attention, 3, "attn_mask", insert_call(graph, attention, slot_causal_mask, (slots, buffer)))
