"""KV-cache sites of a decoder graph: per attention, the keys and values that the graph stores back into
the cache (DynamicCache: torch.cat([past, new], dim=-2), returned as graph outputs) and read by it, with a
ScoredCache the per-position scores stored beside them (torch.cat([past, new_zeros], dim=-1)), and with a
PositionedCache the positions of the entries (torch.cat([past, appended_positions(new)], dim=-1))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from tokensparse.fx.patterns.attention import AttentionSite, find_attention_sites
from tokensparse.fx.patterns.graph import arg, is_op, meta_value, shape_of
from tokensparse.pipeline import MatchFailure
from tokensparse.runtime.static_cache import first_slots

_VIEWS = ("reshape", "view", "expand", "unsqueeze", "repeat_interleave", "contiguous", "clone", "to", "_to_copy",
          "getitem")


@dataclass
class StaticBuffers:
    """Where a StaticCache layer is written: keys.index_copy_(2, slots, new_keys) into fixed buffers, at slots
    arange(S) + cumulative_length. `created` when the graph allocates the buffers (a prefill into an empty
    cache, whose buffers and length the graph returns); else they are inputs (a decode step)."""

    keys: fx.Node           # the [B, H_kv, max_len, d] buffers
    values: fx.Node
    slots: fx.Node          # [S] the slots this forward writes
    length: fx.Node         # the layer's cumulative_length as the graph reads it
    created: bool
    scores: Optional[fx.Node] = None    # a ScoredStaticCache layer's [B, H_kv, max_len] scores buffer


@dataclass
class CacheSite:
    """One attention's cache: keys/values [B, H_kv, L, d] as stored (the cat nodes; for a StaticCache prefill,
    the new keys and values), its queries, and the stored scores [B, H_kv, L] when the cache carries them
    (ScoredCache)."""

    attention: AttentionSite
    keys: fx.Node
    values: fx.Node
    scores: Optional[fx.Node] = None
    static: Optional[StaticBuffers] = None
    # A sliding-window layer (DynamicSlidingWindowLayer): the graph stores these slices of the last positions of
    # keys and values, not keys and values themselves.
    windows: Optional[tuple[fx.Node, fx.Node]] = None
    # A PositionedCache layer's positions [B, H_kv, L] (int64) of the keys the attention reads, as stored.
    positions: Optional[fx.Node] = None

    @property
    def path(self) -> str:
        return self.attention.module_path

    @property
    def query_length(self):
        return shape_of(self.attention.q)[2]

    @property
    def cache_length(self):
        return shape_of(self.keys)[2]


def find_cache_sites(gm: fx.GraphModule) -> list[CacheSite]:
    """Every attention whose keys and values come from a cache update that the graph returns; MatchFailure
    says why there is none, or why a site cannot be evicted."""
    outputs = set(gm.graph.find_nodes(op="output")[0].all_input_nodes)
    scores, positions = _scores_by_new_keys(outputs), _positions_by_new_keys(outputs)
    attentions, _ = find_attention_sites(gm)
    sites = []
    for attention in attentions:
        keys, values = _cache_update(attention.k), _cache_update(attention.v)
        if keys is None or values is None:
            continue                            # a vision tower's attention, or no cache in this call
        windows = _stored_windows(keys, values, outputs)
        if windows is None and (keys not in outputs or values not in outputs):
            continue
        new_keys = keys.args[0][-1]
        sites.append(CacheSite(attention, keys, values, scores.get(new_keys), windows=windows,
                               positions=positions.get(new_keys)))
    if not sites:
        sites = _static_sites(attentions, outputs)
    if not sites:
        raise MatchFailure("no KV cache: no attention reads keys and values that the graph stores back "
                           "(use_cache=False, or a cache other than DynamicCache and StaticCache)")
    return sites


def continues_a_cache(gm: fx.GraphModule) -> bool:
    """Whether the graph extends a KV cache that earlier calls filled (a decode step): its cache's past keys are
    not empty (a DynamicCache prefill concatenates onto an empty tensor), or its StaticCache buffers are inputs."""
    try:
        site = find_cache_sites(gm)[0]
    except MatchFailure:
        return False
    if site.static is not None:
        return not site.static.created
    past = meta_value(site.keys.args[0][0])
    return past is not None and past.numel() != 0


def _static_sites(attentions, outputs) -> list[CacheSite]:
    """Attentions that read a StaticCache layer's buffers; a prefill's site holds the new keys and values
    (the buffers start empty), a decode step's the buffers."""
    sites, scores = [], None
    for attention in attentions:
        keys, values = static_write(attention.k), static_write(attention.v)
        if keys is None or values is None:
            continue
        slots = keys.args[2]
        # a layer that a language-model policy pruned writes the first of those slots (fx/passes/prune_sequence.py)
        base = slots.args[0] if slots.op == "call_function" and slots.target is first_slots else slots
        if not (is_op(base, "add") and len(base.args) == 2 and isinstance(base.args[1], fx.Node)):
            raise MatchFailure(f"{attention.module_path}: its StaticCache slots are not arange(S) + cumulative_length")
        created = is_op(keys.args[0], "zeros") and keys.args[0] in outputs and values.args[0] in outputs
        if not created and keys.args[0].op != "placeholder":
            raise MatchFailure(f"{attention.module_path}: its StaticCache buffers are neither made by this graph nor "
                               f"its inputs")
        scores = _scores_by_length(attention.node.graph) if scores is None else scores
        buffers = StaticBuffers(keys.args[0], values.args[0], slots, base.args[1], created, scores.get(base.args[1]))
        read = 3 if created else 0          # an empty cache's contents are the new keys; else the buffers
        sites.append(CacheSite(attention, keys.args[read], values.args[read], static=buffers))
    return sites


def _scores_by_length(graph: fx.Graph) -> dict:
    """The scores buffers that ScoredStaticCache layers clear at their new slots arange(S) + length (each layer's
    scores.index_fill_(2, slots, 0)), by that layer's length node."""
    return {node.args[2].args[1]: node.args[0] for node in graph.nodes
            if is_op(node, "index_fill_") and len(node.args) > 2 and is_op(node.args[2], "add")}


def static_write(node: fx.Node, hops: int = 6) -> Optional[fx.Node]:
    """The buffer.index_copy_(2, slots, new) that writes what `node` (an attention's k or v) reads, through views."""
    for _ in range(hops):
        writes = [user for user in node.users if is_op(user, "index_copy_") and user.args[0] is node
                  and user.args[1] in (2, -2)]
        if writes:
            return writes[0]
        if not is_op(node, *_VIEWS) and not _whole_slice(node):
            return None
        node = node.args[0]
    return None


def entered_count(write: fx.Node) -> Optional[fx.Node]:
    """The 0-d count of entered positions of a counting StaticCache layer (runtime/counted_cache.py), which
    adds entered.add_(appended_count(new_keys)), traced as ones_like(new_keys[0, 0, :, 0]).sum(), for the new
    keys that `write` (the keys' index_copy_) stores; None for a layer that does not count."""
    for read in write.args[3].users:
        for ones in (user for user in read.users if is_op(user, "ones_like")):
            for total in (user for user in ones.users if is_op(user, "sum")):
                for add in (user for user in total.users if is_op(user, "add_") and user.args[1] is total):
                    return add.args[0]
    return None


def _scores_by_new_keys(outputs) -> dict:
    """The returned score updates cat([past, new_keys.new_zeros(B, H_kv, S)], dim=-1), by their new keys."""
    found = {}
    for node in outputs:
        if is_op(node, "cat") and arg(node, 1, "dim") in (-1, 2) and len(shape_of(node) or ()) == 3:
            appended = node.args[0][-1]
            if is_op(appended, "new_zeros") and isinstance(appended.args[0], fx.Node):
                found[appended.args[0]] = node
    return found


def _positions_by_new_keys(outputs) -> dict:
    """The returned position updates cat([past, appended_positions(new_keys, seen)], dim=-1) (int64), by their new
    keys: appended_positions counts ones_like(new_keys[:, :, :, 0])."""
    found = {}
    for node in outputs:
        value = meta_value(node)
        if not (is_op(node, "cat") and arg(node, 1, "dim") in (-1, 2) and isinstance(value, torch.Tensor)
                and value.dim() == 3 and value.dtype == torch.int64):
            continue
        ones = _ancestor(node.args[0][-1], "ones_like", hops=4)
        if ones is None or not is_op(ones.args[0], "getitem", "select"):
            continue
        new_keys = ones.args[0].args[0]
        while isinstance(new_keys, fx.Node) and is_op(new_keys, "slice") and _whole_slice(new_keys):
            new_keys = new_keys.args[0]         # torch.export's x[:, :, :, 0] with a dynamic batch
        if isinstance(new_keys, fx.Node):
            found[new_keys] = node
    return found


def _ancestor(node: fx.Node, name: str, hops: int) -> Optional[fx.Node]:
    """The nearest `name` op among the inputs of `node`, up to `hops` steps back, or None."""
    frontier = [node]
    for _ in range(hops + 1):
        for candidate in frontier:
            if is_op(candidate, name):
                return candidate
        frontier = [parent for candidate in frontier for parent in candidate.all_input_nodes]
    return None


def _whole_slice(node: fx.Node) -> bool:
    """x[0:] on some axis (torch.export writes repeat_kv's x[:, :, None] with a dynamic batch this way): x itself."""
    start, end, step = (list(node.args[2:5]) + [None] * 3)[:3] if is_op(node, "slice") else (1, None, None)
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2 ** 62)) and step in (1, None)


def _cache_update(node: fx.Node, hops: int = 6) -> Optional[fx.Node]:
    """The torch.cat([past, new], dim=-2) that `node` (an attention's k or v) is read from, through views."""
    for _ in range(hops):
        if is_op(node, "cat") and arg(node, 1, "dim") in (-2, 2) and len(shape_of(node) or ()) == 4:
            return node
        if not is_op(node, *_VIEWS) and not _whole_slice(node):
            return None
        node = node.args[0]
    return None


def _is_window_of(node: fx.Node, keys: fx.Node) -> bool:
    """Whether `node` slices the last positions of `keys` along the cache axis (a sliding-window layer)."""
    return is_op(node, "getitem", "slice") and node.args[0] is keys


def _stored_windows(keys: fx.Node, values: fx.Node, outputs: set) -> Optional[tuple[fx.Node, fx.Node]]:
    """The slices of the last positions of keys and values that a sliding-window layer stores (graph outputs),
    or None for a layer that stores keys and values whole."""
    found = [next((user for user in node.users if user in outputs and _is_window_of(user, node)), None)
             for node in (keys, values)]
    return None if None in found else (found[0], found[1])
