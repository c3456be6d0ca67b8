"""Decode steps into a StaticCache that a language-model policy (FastV, Chen et al., ECCV 2024, and the others
of fx/passes/prune_sequence.py) pruned at prefill: each attention sees its layer's filled slots up to its own,
since a pruned layer's slots no longer equal positions and generate() masks by position."""

from __future__ import annotations

import operator

import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.patterns.graph import arg, insert_call, set_arg, shape_of
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.kv_cache import find_cache_sites
from tokensparse.runtime.static_cache import slot_causal_mask, slot_padding


def static_slot_masks_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Mask each StaticCache decode attention by its layer's filled slots (slot_causal_mask)."""
    # Replace every StaticCache decode attention's mask by slot_causal_mask over its layer's buffer. generate() masks
    # by position, which a pruned layer's slots no longer equal.
    sites = [site for site in find_cache_sites(gm) if site.static is not None and not site.static.created]
    if not sites:
        raise MatchFailure("no StaticCache decode step in this graph")
    for site in sites:
        padding = decode_slot_padding(gm.graph, site.attention.node, site.static.slots, site.static.keys, False)
        attend_over_filled_slots(gm.graph, site.attention.node, site.static.slots, site.static.keys, padding)
        ctx.acted_blocks.append(site.path)
        ctx.record("static_slot_masks", f"{site.path}: attends over its StaticCache's filled slots"
                                        f"{' but its padding' if padding is not None else ''}")
    return gm


def attend_over_filled_slots(graph: fx.Graph, attention: fx.Node, slots, buffer: fx.Node, padding=None) -> None:
    """Give a StaticCache attention the mask slot_causal_mask(slots, buffer, padding): each query, written at its
    slot, sees the buffer's filled slots up to its own but those holding padding (padding [B, max_len] or None;
    slots and positions differ once a cache is pruned or evicted)."""
    set_arg(attention, 3, "attn_mask", insert_call(graph, attention, slot_causal_mask, (slots, buffer, padding)))


def decode_slot_padding(graph: fx.Graph, attention: fx.Node, slots, buffer: fx.Node, evicted: bool, entered=None):
    """[B, max_len] bool, the slots of a decode step's StaticCache layer that hold a padded batch's padding
    (runtime/static_cache.py: slot_padding; `evicted`: the layer's cache was evicted by a KV policy rather than
    pruned; `entered`: its count of entered positions, for a layer both pruned and evicted), read from the mask
    over positions that tokensparse.compile() hands padded decode steps; None for an unpadded batch, whose
    decode steps get generate()'s own mask."""
    position_mask = handed_position_mask(attention)
    if position_mask is None:
        return None
    return insert_call(graph, attention, slot_padding, (slots, buffer, position_mask, evicted, entered))


def handed_position_mask(attention: fx.Node):
    """The 4-D mask over positions that tokensparse.compile() hands a padded batch's decode step
    (runtime/static_decode_masks.py: StaticDecodeMasks; a graph input, which the model may slice: followed back
    through that slice, and through the slot mask of an earlier pass), or None when the attention's mask is built
    inside the graph (generate()'s own, for an unpadded batch)."""
    mask = arg(attention, 3, "attn_mask")
    if isinstance(mask, fx.Node) and mask.target is slot_causal_mask:    # the slot mask an earlier pass gave it
        padding = mask.args[2]
        mask = padding.args[2] if isinstance(padding, fx.Node) and padding.target is slot_padding else None
    while isinstance(mask, fx.Node) and mask.target is operator.getitem and isinstance(mask.args[1], tuple):
        mask = mask.args[0]
    if isinstance(mask, fx.Node) and mask.op == "placeholder" and len(shape_of(mask) or ()) == 4:
        return mask
    return None
