"""Sliding-window attention over an evicted cache, by the positions its entries came from (Mistral 7B, Jiang et
al., 2023; Longformer, Beltagy et al., 2020): a query at position p sees the held entries at positions q with
p - W < q <= p. transformers masks a sliding-window layer by the entries' places in the cache, which equal
positions only while nothing was evicted; a PositionedCache records each entry's position per KV head."""

from __future__ import annotations

import torch
import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.patterns.graph import insert_call, is_op, set_arg
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.kv_cache import CacheSite


def sliding_positions_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Mask each sliding-window layer (Jiang et al. 2023) by its entries' positions, not cache slots."""
    # Narrow each sliding-window layer's attention mask to the window over its entries' positions.
    for site, window in zip(ctx.kv.sites, site_windows(ctx)):
        if not window or site.positions is None:
            continue                # a full layer, or a cache without positions (refused past the window)
        before = _mask_reader(site)
        narrowed = insert_call(gm.graph, before, window_mask, (site.attention.mask, site.positions, site.attention.q,
                                                               window))
        _replace_mask(site, before, narrowed)
        if site.path not in ctx.acted_blocks:
            ctx.acted_blocks.append(site.path)
        ctx.record("sliding_positions", f"{site.path}: each query sees the entries within {window} positions of its "
                                        f"own")
    return gm


def site_windows(ctx: PassContext) -> list[int]:
    """The sliding window of each cache site's layer (0 for a full-attention layer): CallerFacts.sliding_windows,
    one per decoder layer, which tokensparse.compile() hands over for a model with sliding-window layers; all 0
    without."""
    windows = ctx.caller.sliding_windows
    if not windows:
        return [0] * len(ctx.kv.sites)
    if len(windows) != len(ctx.kv.sites):
        raise MatchFailure(f"the model has {len(windows)} decoder layers with sliding windows {list(windows)} but this "
                           f"graph has {len(ctx.kv.sites)} cache sites, so they cannot be paired")
    return list(windows)


def window_mask(mask, positions: torch.Tensor, q: torch.Tensor, window: int) -> torch.Tensor:
    """The attention's mask [B, 1 or H, Q, L] (bool where allowed, or additive float; None: causal) narrowed to
    each query's window: for a query at p, keys at positions above p - window that the mask lets it see (None:
    also at most p). positions [B, H_kv, L] are the keys', the last Q of them the queries' own; q [B, H, Q, d].
    Returns [B, H, Q, L]."""
    groups = q.shape[1] // positions.shape[1]
    if mask is None:
        return window_allowed(positions, q.shape[2], window).repeat_interleave(groups, dim=1)
    # The model's own mask says which earlier (and, for an image's tokens or a prefix, later) entries each query
    # sees; the window only takes away those too far back, never adds causality that the model does not have.
    allowed = within_window(positions, q.shape[2], window).repeat_interleave(groups, dim=1)
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def within_window(positions: torch.Tensor, queries: int, window: int) -> torch.Tensor:
    """[B, H_kv, Q, L] bool: the keys not too far back for each query: position > p - window for a query at p."""
    at = positions[..., positions.shape[-1] - queries:, None]
    return positions[..., None, :] > at - window


def window_allowed(positions: torch.Tensor, queries: int, window: int) -> torch.Tensor:
    """[B, H_kv, Q, L] bool: which keys, at positions [B, H_kv, L] whose last Q are the queries' own, each query at
    p sees in a sliding window: p - window < position <= p."""
    at = positions[..., positions.shape[-1] - queries:, None]          # [B, H_kv, Q, 1]
    keys = positions[..., None, :]                                      # [B, H_kv, 1, L]
    return (keys <= at) & (keys > at - window)


def _mask_reader(site: CacheSite) -> fx.Node:
    """The node that reads the attention's mask: the SDPA call, or an unfused attention's logits + mask."""
    if site.attention.kind == "sdpa":
        return site.attention.node
    node = site.attention.node.args[0]
    for _ in range(6):
        if is_op(node, "add", "add_") and site.attention.mask is not None and node.args[1] is site.attention.mask:
            return node
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    raise MatchFailure(f"{site.path}: an unfused attention without an additive mask, which its sliding window "
                       f"over positions would narrow")


def _replace_mask(site: CacheSite, reader: fx.Node, narrowed: fx.Node) -> None:
    if site.attention.kind == "sdpa":
        set_arg(reader, 3, "attn_mask", narrowed)
        set_arg(reader, 5, "is_causal", False)      # the narrowed mask is causal by position
        return
    reader.replace_input_with(site.attention.mask, narrowed)
