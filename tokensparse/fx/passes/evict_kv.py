"""Evict KV-cache positions where the graph stores its cache (SnapKV, Li et al., 2024; StreamingLLM, Xiao
et al., ICLR 2024; H2O, Zhang et al., NeurIPS 2023; ZipVL, He et al., 2024; GUI-KV, Huang et al., 2025; key
norm, Devoto et al., EMNLP 2024):
the attention of this forward reads the full cache, the cache kept for the next steps holds only the kept
positions (and, for H2O, their accumulated scores; with a PositionedCache, their positions, of which a sliding-
window layer keeps the last window - 1). StreamingLLM(positions="cache") stores its keys before RoPE and its
attention reads them rotated to their cache slots (runtime/cache_positions.py)."""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.passes.sizes import same_size
from tokensparse.fx.passes.sliding_positions import site_windows
from tokensparse.fx.passes.static_slot_masks import attend_over_filled_slots, decode_slot_padding, handed_position_mask
from tokensparse.fx.patterns.graph import insert_call, is_op, shape_of
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.kv_cache import CacheSite, entered_count, static_write
from tokensparse.fx.patterns.vision_span import find_vision_span
from tokensparse.policies import KVPolicy
from tokensparse.policies.fastv import attended
from tokensparse.policies.kv_policy import (ATTENTION_COLUMN_SUMS, KV_EVICT, NotApplicable, SiteInputs, is_prefill,
                                            padded_positions)
from tokensparse.runtime.cache_positions import keys_at_cache_slots, keys_before_rope
from tokensparse.runtime.sequence import gather_tokens, vision_mask_2d
from tokensparse.runtime.static_cache import filled_length, refill_buffer


def evict_kv_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Return each layer's cache evicted to the kept positions (SnapKV, Li et al. 2024; H2O; see above)."""
    # Before the graph returns each layer's grown keys and values, choose the kept positions per KV head and return
    # the evicted cache in their place; a scored policy (H2O) also returns the accumulated scores.
    if ctx.policy.stage != "kv":
        return gm
    output = gm.graph.find_nodes(op="output")[0]
    queries = ctx.kv.sites[0].query_length        # layer 0 sees every new token: > 1 in a prefill
    at_slots = _at_cache_positions(ctx)
    if ctx.kv.sites[0].static is not None:
        return _evict_static(gm, ctx, output, queries)
    sliding = next((site.path for site in ctx.kv.sites if site.windows is not None), None)
    if sliding is not None and not ctx.caller.masks_follow_cache:
        raise MatchFailure(f"{sliding}: its cache keeps a sliding window of the keys (a sliding-window layer, such as "
                           f"Mistral's sliding_window), whose evicted positions stay right only while every position "
                           f"fits the window: evict through tokensparse.compile(model, config), which checks that")
    for site, window in zip(ctx.kv.sites, site_windows(ctx)):
        if at_slots:
            if window or site.windows is not None or site.positions is not None:
                raise ValueError(f"kv={ctx.policy.name}(positions='cache') on a model with sliding-window layers is "
                                 f"not supported ({site.path}): use positions='original'")
            site = _read_at_cache_slots(gm.graph, output, site, ctx.policy.rope)
            ctx.record("evict_kv", f"{site.path}: the cache holds keys before RoPE, read at their cache slots")
        padding = _padding(gm.graph, output, site, ctx, window)
        scores = _accumulated_scores(gm.graph, output, ctx.policy, site, padding, window)
        count = _kept_count(gm.graph, output, ctx.policy, site, queries)
        returned = [site.keys, site.values, site.scores, site.positions]      # what the graph stores, in that order
        if count is None and scores is not None:
            output.replace_input_with(site.scores, scores)
            returned[2] = scores
            ctx.acted_blocks.append(site.path)
            ctx.record("evict_kv", f"{site.path}: the cache accumulates this forward's attention")
        elif count is not None:
            kept = _kept(gm.graph, output, ctx.policy, site, count, scores, padding, queries)
            keys, values = _evicted(gm.graph, output, site, kept)
            _store(gm.graph, output, site, keys, values)
            returned[:2] = keys, values
            for index, beside in ((2, scores), (3, site.positions)):
                if beside is not None:      # H2O's scores, a PositionedCache's positions: kept with their keys
                    returned[index] = _replace_returned(gm.graph, output, returned[index], torch.gather,
                                                        (beside, 2, kept))
            ctx.acted_blocks.append(site.path)
            ctx.record("evict_kv", f"{site.path}: the cache keeps {count} of {site.cache_length} positions per KV "
                                   f"head")
        if window and site.positions is not None:
            for node in returned:
                if node is not None:
                    _replace_returned(gm.graph, output, node, last_entries, (node, window - 1))
            if site.path not in ctx.acted_blocks:
                ctx.acted_blocks.append(site.path)
            ctx.record("evict_kv", f"{site.path}: a sliding-window layer, whose cache keeps at most its last "
                                   f"{window - 1} entries (the others left the window of every later query)")
        if at_slots and site.path not in ctx.acted_blocks:      # every graph stores keys before RoPE, evicting or not
            ctx.acted_blocks.append(site.path)
    return gm


def _at_cache_positions(ctx: PassContext) -> bool:
    """Whether the policy is StreamingLLM(positions="cache"); ValueError where its positions are not assigned."""
    policy = ctx.policy
    if not policy.at_cache_positions:
        return False
    if not policy.rope:
        raise ValueError(f"kv={policy.name}(positions='cache') needs tokensparse.compile(model, config), whose forward "
                         f"gives the new tokens their cache positions and whose policy carries the model's RoPE "
                         f"frequencies (torch.compile(backend='tokensparse') and the ONNX exports do not)")
    if ctx.kv.sites[0].static is not None:
        raise ValueError(f"kv={policy.name}(positions='cache') with a StaticCache is not supported: use a DynamicCache "
                         f"(generate()'s default)")
    return True


def _read_at_cache_slots(graph: fx.Graph, output: fx.Node, site: CacheSite, rope: tuple) -> CacheSite:
    """The site whose graph stores cat([held, new]) with the new keys rotated back from their slots (keys before
    RoPE), and whose attention reads cat([held rotated to slots 0..n-1, new]) in place of cat([held, new])."""
    grown = site.keys
    if not (is_op(grown, "cat") and len(grown.args[0]) == 2):
        raise ValueError(f"kv=streamingllm(positions='cache'): {site.path}'s cache update is not cat([held, new]) (a "
                         f"DynamicCache's), whose keys it stores before RoPE")
    held, new = grown.args[0]
    read = insert_call(graph, grown.next, keys_at_cache_slots, (held, new, rope))
    stored = insert_call(graph, output, keys_before_rope, (held, new, rope))
    for node in (read, stored):
        node.meta.update({key: grown.meta[key] for key in ("val", "example_value") if key in grown.meta})
    grown.replace_all_uses_with(read, delete_user_cb=lambda user: user is not output)
    output.replace_input_with(grown, stored)
    attention = site.attention
    if attention.k is grown:
        attention = dataclasses.replace(attention, k=read)
    return dataclasses.replace(site, keys=stored, attention=attention)


def _replace_returned(graph: fx.Graph, output: fx.Node, returned: fx.Node, fn, args: tuple) -> fx.Node:
    """Return fn(*args) where the graph returned `returned`."""
    replacement = insert_call(graph, output, fn, args)
    output.replace_input_with(returned, replacement)
    return replacement


def last_entries(stored: torch.Tensor, count: int) -> torch.Tensor:
    """The last `count` entries (or all, if fewer) of a stored cache tensor [B, H_kv, L, ...] along its cache
    axis. Its entries are in the order of their positions, so in a sliding window of count + 1, those before
    them are outside the window of every later query. No guard on a symbolic L (a narrow would guard its start)."""
    length = stored.shape[2]
    kept = torch.sym_min(length, count)
    return stored.index_select(2, torch.arange(kept, device=stored.device) + (length - kept))


def _evict_static(gm: fx.GraphModule, ctx: PassContext, output: fx.Node, queries) -> fx.GraphModule:
    """A StaticCache: the prefill returns buffers whose first slots hold the kept positions and a length set to
    their count, so decode steps write after them; every decode step's attention sees the filled slots up
    to its own (generate()'s mask follows positions, which no longer equal slots)."""
    policy = ctx.policy
    if policy.scored and any(site.static.scores is None for site in ctx.kv.sites):
        raise MatchFailure(f"{policy.name} accumulates attention per cached slot and this StaticCache carries no "
                           f"scores: pass past_key_values=tokensparse.ScoredStaticCache(model.config, max_cache_len)")
    if not policy.static_cache_form:
        raise MatchFailure(f"{policy.name} has no StaticCache form yet (use a DynamicCache)")
    if not ctx.caller.masks_follow_cache:
        raise MatchFailure("evicting from a StaticCache needs tokensparse.compile(model, config), whose decode steps "
                           "attend over each layer's filled slots (with a padded batch's padding from the mask over "
                           "positions it hands them)")
    for site in ctx.kv.sites:
        buffers = site.static
        if not buffers.created:
            padding = decode_slot_padding(gm.graph, site.attention.node, buffers.slots, buffers.keys, True,
                                          _entered(site, ctx))
            attend_over_filled_slots(gm.graph, site.attention.node, buffers.slots, buffers.keys, padding)
            ctx.acted_blocks.append(site.path)
            ctx.record("evict_kv", f"{site.path}: attends over the StaticCache's filled slots"
                                   f"{' but its padding' if padding is not None else ''}")
            step = policy.static_decode_step(buffers, _site_inputs(gm.graph, output, site, padding=padding,
                                                                   prefill=False))
            if step is not None:
                target, arguments, does = step
                insert_call(gm.graph, site.attention.node.next, target, arguments)
                ctx.record("evict_kv", f"{site.path}: then {does}")
            continue
        scores, padding = None, _prefill_padding(gm.graph, output, site)
        if policy.scored:       # the prefill's attention, summed per key: the slots' first scores
            scores = insert_call(gm.graph, output, ATTENTION_COLUMN_SUMS, (site.attention.q, site.keys, _scale(site),
                                                                           padding))
        count = _kept_count(gm.graph, output, policy, site, queries)
        if count is None:
            if scores is not None:
                output.replace_input_with(buffers.scores, insert_call(gm.graph, output, refill_buffer,
                                                                      (scores, buffers.scores)))
                ctx.acted_blocks.append(site.path)
            continue
        kept = _kept(gm.graph, output, policy, site, count, scores, padding, queries)
        if scores is not None:
            output.replace_input_with(buffers.scores, insert_call(gm.graph, output, refill_buffer, (
                insert_call(gm.graph, output, torch.gather, (scores, 2, kept)), buffers.scores)))
        keys, values = _evicted(gm.graph, output, site, kept)
        output.replace_input_with(buffers.keys, insert_call(gm.graph, output, refill_buffer, (keys, buffers.keys)))
        output.replace_input_with(buffers.values, insert_call(gm.graph, output, refill_buffer,
                                                              (values, buffers.values)))
        output.replace_input_with(buffers.length, insert_call(gm.graph, output, filled_length,
                                                              (keys, buffers.length)))
        ctx.acted_blocks.append(site.path)
        ctx.record("evict_kv", f"{site.path}: the StaticCache keeps {count} of {site.cache_length} positions per "
                               f"KV head in its first slots")
    return gm


def _store(graph: fx.Graph, output: fx.Node, site: CacheSite, keys: fx.Node, values: fx.Node) -> None:
    """Return the evicted keys and values where the graph returned the grown ones; a sliding-window layer
    returns its slices of the last positions of them."""
    if site.windows is None:
        output.replace_input_with(site.keys, keys)
        output.replace_input_with(site.values, values)
        return
    for window, grown, evicted in zip(site.windows, (site.keys, site.values), (keys, values)):
        with graph.inserting_before(output):
            sliced = graph.node_copy(window, lambda node, grown=grown, evicted=evicted:
                                     evicted if node is grown else node)
        output.replace_input_with(window, sliced)


def _padding(graph: fx.Graph, point: fx.Node, site: CacheSite, ctx: PassContext, window: int = 0):
    """[B, L] bool: the cached positions that are a padded batch's padding, read from the attention's mask;
    None for an attention without a mask. Evicting with padding needs tokensparse.compile(), whose decode
    steps hand each layer the padding mask of its own evicted cache. In a sliding-window layer that records
    positions, the positions no query sees (its last query does not see those before its window)."""
    if site.attention.mask is None:
        return None
    if not ctx.caller.masks_follow_cache:
        raise MatchFailure(f"{site.path}: its attention has a mask (a padded batch), and generate() would build the "
                           f"decode masks for the full-length cache: evict from padded batches through "
                           f"tokensparse.compile(model, config), which gives each layer the mask of its evicted cache")
    if window and site.positions is not None:
        return insert_call(graph, point, unseen_positions, (site.attention.mask, site.keys))
    return insert_call(graph, point, cache_padding, (site.attention.mask, site.keys))


def _entered(site: CacheSite, ctx: PassContext):
    """A counting StaticCache layer's count of entered positions, which a padded batch's decode masks need
    after a language-model policy pruned the layer (runtime/static_cache.py: slot_padding); None otherwise (a
    KV policy alone reads the real positions from the mask, which may cover only the last max_len positions)."""
    if not ctx.caller.pruned_and_evicted:
        return None
    entered = entered_count(static_write(site.attention.k))
    if entered is None and handed_position_mask(site.attention.node) is not None:
        raise MatchFailure(f"{site.path}: a padded batch under a language-model policy and a KV policy needs each "
                           f"StaticCache layer to count the positions that entered it: pass past_key_values="
                           f"tokensparse.CountedStaticCache(model.config, max_cache_len"
                           f"{', scores=True' if ctx.policy.scored else ''})")
    return entered


def _prefill_padding(graph: fx.Graph, point: fx.Node, site: CacheSite):
    """[B, L] bool: which of the L positions a prefill writes to an empty StaticCache's first slots are padding,
    read from the attention's mask over the buffer's slots; None for an attention without a mask."""
    if site.attention.mask is None:
        return None
    return insert_call(graph, point, first_slots_padding, (site.attention.mask, site.keys))


def first_slots_padding(attention_mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: which of the first L slots of a StaticCache (keys [B, H_kv, L, d] written there) the mask
    [B, 1 or H, Q, max_len] hides from its last query (a padded batch's padding)."""
    return padded_positions(attention_mask[..., : keys.shape[2]], keys.shape[2])


def cache_padding(attention_mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: which positions of the cache keys [B, H_kv, L, d] the attention's mask hides from its last
    query (a padded batch's padding)."""
    return padded_positions(attention_mask, keys.shape[2])


def unseen_positions(attention_mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: which positions of the cache keys [B, H_kv, L, d] the mask [B, 1 or H, Q, >= L] hides from
    every query (a padded batch's padding; a real position is seen at least by its own query, or by a decode
    step's query, whose mask tokensparse.compile() builds without the window)."""
    columns = attention_mask[:, :1, :, attention_mask.shape[-1] - keys.shape[2]:]
    return ~attended(columns).any(dim=2)[:, 0]


def _evicted(graph: fx.Graph, point: fx.Node, site: CacheSite, kept: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The site's keys and values gathered at the kept positions [B, H_kv, k] (tokensparse::kv_evict)."""
    evicted = insert_call(graph, point, KV_EVICT, (site.keys, site.values, kept))
    return (insert_call(graph, point, operator.getitem, (evicted, 0)),
            insert_call(graph, point, operator.getitem, (evicted, 1)))


def _accumulated_scores(graph: fx.Graph, point: fx.Node, policy: KVPolicy, site: CacheSite, padding, window: int):
    """For a scored policy, the stored scores plus this forward's attention column sums (within each query's
    sliding window by position, in a sliding-window layer that records positions); else None."""
    if not policy.scored:
        return None
    if site.scores is None:
        raise MatchFailure(f"{site.path}: {policy.name} accumulates attention per cached position and this cache "
                           f"carries no scores: pass past_key_values=tokensparse.ScoredCache() to the model "
                           f"(tokensparse.compile() does this for generate())")
    _zeros_sized_like_the_new_keys(graph, site.scores.args[0][-1])
    arguments = (site.attention.q, site.keys, _scale(site), padding)
    if window and site.positions is not None:
        arguments += (site.positions, window)
    sums = insert_call(graph, point, ATTENTION_COLUMN_SUMS, arguments)
    return insert_call(graph, point, torch.add, (site.scores, sums))


def _zeros_sized_like_the_new_keys(graph: fx.Graph, zeros: fx.Node) -> None:
    """The cache's appended scores new_keys.new_zeros(B, H_kv, S) were traced with sizes fixed before a
    token pass cut the sequence: read them from the new keys instead."""
    new_keys = zeros.args[0]
    sizes = [insert_call(graph, zeros, torch.ops.aten.sym_size.int, (new_keys, dim)) for dim in range(3)]
    # dynamo's method call takes the sizes as varargs, torch.export's aten.new_zeros as one list
    zeros.args = (new_keys, sizes) if zeros.target is torch.ops.aten.new_zeros.default else (new_keys, *sizes)


def _kept_count(graph: fx.Graph, point: fx.Node, policy: KVPolicy, site: CacheSite, queries):
    """How many positions this site keeps (an int, or a node when the cache length is data-dependent, as
    after FastV; DATA_DEPENDENT when the selection decides), or None when it keeps them all."""
    try:
        return policy.graph_count(queries, site.cache_length, lambda budget: _at_most(graph, point, site, budget))
    except NotApplicable as reason:
        raise MatchFailure(f"{site.path}: {reason}") from None


def _at_most(graph: fx.Graph, point: fx.Node, site: CacheSite, budget: int) -> fx.Node:
    """min(cache length, budget) as a graph value, for a data-dependent cache length."""
    size = insert_call(graph, point, torch.ops.aten.sym_size.int, (site.keys, 2))
    return insert_call(graph, point, torch.sym_min, (size, budget))


def _scale(site: CacheSite) -> float:
    scale = site.attention.scale
    if not isinstance(scale, float):
        raise MatchFailure(f"{site.path}: its attention scale is a graph input, not a constant")
    return scale


def _kept(graph: fx.Graph, point: fx.Node, policy: KVPolicy, site: CacheSite, count, scores,
          padding, queries) -> fx.Node:
    """The kept positions [B, H_kv, count]: the policy's selection step, inserted before `point`."""
    inputs = _site_inputs(graph, point, site, count, scores, padding, is_prefill(queries))
    try:
        target, arguments = policy.graph_selection(inputs)
    except NotApplicable as reason:
        raise MatchFailure(f"{site.path}: {reason}") from None
    return insert_call(graph, point, target, arguments)


def _site_inputs(graph: fx.Graph, point: fx.Node, site: CacheSite, count=None, scores=None, padding=None,
                 prefill: bool = True) -> SiteInputs:
    """What a policy's graph step may read at this site, the image mask and hidden states found only if read."""
    return SiteInputs(site.attention.q, site.keys, lambda: _scale(site), count, scores, padding, prefill,
                      lambda: _image_mask(graph, point, site), lambda: _attention_input(site))


def _image_mask(graph: fx.Graph, point: fx.Node, site: CacheSite):
    """[B, L] bool: which cached positions are image tokens (the merge's mask, or in a layer that a
    language-model policy pruned, that mask gathered by each stage's kept positions), or None in a graph
    without images (every position is text)."""
    try:
        span = find_vision_span(graph.owning_module)
    except MatchFailure:
        return None
    mask = insert_call(graph, point, vision_mask_2d, span.masks)
    if same_size(span.sequence, site.cache_length):
        return mask
    for kept in _stage_kept_positions(graph):
        mask = insert_call(graph, point, gather_tokens, (mask, kept, (1,)))
        if same_size(shape_of(kept)[1], site.cache_length):
            return mask
    raise MatchFailure(f"{site.path}: its cache holds {site.cache_length} positions but the image mask covers "
                       f"{span.sequence}, and no language-model policy's kept positions have that length (a cached "
                       f"prefix, or a sequence cut by other means)")


def _stage_kept_positions(graph: fx.Graph) -> list[fx.Node]:
    """The kept positions [B, S'] of each stage of a language-model policy, in order: what its pass gathers the
    tokens by (fx/passes/prune_sequence.py), each relative to the stage before."""
    stages = []
    for node in graph.nodes:
        kept = node.args[1] if node.target is gather_tokens else None
        if isinstance(kept, fx.Node) and kept not in stages and len(shape_of(kept) or ()) == 2:
            stages.append(kept)
    return stages


def _attention_input(site: CacheSite) -> fx.Node:
    """The hidden states [B, S, D] the attention reads: the input of its value projection."""
    node = site.values.args[0][-1]
    for _ in range(6):
        if is_op(node, "linear"):
            return node.args[0]
        if not is_op(node, "view", "reshape", "transpose", "contiguous", "to", "_to_copy"):
            break
        node = node.args[0]
    raise MatchFailure(f"{site.path}: the value projection that GUI-KV's saliency reads was not found")
