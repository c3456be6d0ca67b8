"""Evict KV-cache positions where the graph stores its cache (SnapKV, Li et al., 2024; StreamingLLM, Xiao
et al., ICLR 2024): the attention of this forward reads the full cache, the cache kept for the next
steps holds only the kept positions."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_or_false

from tokensparse.passes.context import PassContext
from tokensparse.patterns.graph import MatchFailure, insert_call
from tokensparse.patterns.kv_cache import CacheSite
from tokensparse.policies import KVPolicy, SnapKV, StreamingLLM
from tokensparse.policies.streamingllm import streaming_keep
from tokensparse.runtime.ops import KV_EVICT, SNAPKV_KEEP


def evict_kv_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Before the graph returns each layer's grown keys and values, choose the kept positions per KV head
    and return the evicted cache in their place."""
    if not isinstance(ctx.policy, KVPolicy):
        return gm
    output = gm.graph.find_nodes(op="output")[0]
    queries = ctx.cache_sites[0].query_length        # layer 0 sees every new token: > 1 in a prefill
    for site in ctx.cache_sites:
        count = _kept_count(gm.graph, output, ctx.policy, site, queries)
        if count is None:
            continue
        kept = _kept(gm.graph, output, ctx.policy, site, count)
        evicted = insert_call(gm.graph, output, KV_EVICT, (site.keys, site.values, kept))
        keys = insert_call(gm.graph, output, operator.getitem, (evicted, 0))
        values = insert_call(gm.graph, output, operator.getitem, (evicted, 1))
        output.replace_input_with(site.keys, keys)
        output.replace_input_with(site.values, values)
        ctx.acted_blocks.append(site.path)
        ctx.record("evict_kv", f"{site.path}: the cache keeps {count} of {site.cache_length} positions per KV head")
    return gm


def _kept_count(graph: fx.Graph, point: fx.Node, policy: KVPolicy, site: CacheSite, queries):
    """How many positions this site keeps (an int, or a node when the cache length is data-dependent, as
    after FastV), or None when it keeps them all."""
    length = site.cache_length
    if isinstance(length, int):
        return policy.kept_count(length) if policy.evicts(queries, length) else None
    if isinstance(policy, StreamingLLM):
        return policy.kept_count(length) if guard_or_false(length > policy.sinks + policy.window) else None
    if isinstance(policy, SnapKV) and queries > 1:
        if not isinstance(policy.budget, int):
            raise MatchFailure(f"{site.path}: its cache length {length} is data-dependent, so SnapKV needs a budget "
                               f"given as a count, not the fraction {policy.budget}")
        size = insert_call(graph, point, torch.ops.aten.sym_size.int, (site.keys, 2))
        return insert_call(graph, point, torch.sym_min, (size, max(policy.budget, policy.window)))
    return None


def _kept(graph: fx.Graph, point: fx.Node, policy: KVPolicy, site: CacheSite, count) -> fx.Node:
    if isinstance(policy, SnapKV):
        scale = site.attention.scale
        if not isinstance(scale, float):
            raise MatchFailure(f"{site.path}: its attention scale is a graph input, not a constant")
        return insert_call(graph, point, SNAPKV_KEEP, (site.attention.q, site.keys, scale, count, policy.window,
                                                       policy.kernel, policy.pooling))
    if isinstance(policy, StreamingLLM):
        return insert_call(graph, point, streaming_keep, (site.keys, policy.sinks, policy.window))
    raise MatchFailure(f"policy {policy.name!r} has no cache selection")
