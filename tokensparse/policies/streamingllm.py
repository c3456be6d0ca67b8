"""StreamingLLM (Xiao et al., ICLR 2024): keep the first `sinks` positions (attention sinks) and the most
recent `window` positions of every layer's cache; evict the middle, at every step. Positions are either each entry's
original one (positions="original") or its place in the cache (positions="cache", as the paper does: the cache holds
keys before RoPE, rotated to their slots 0..L-1 at every step, the new tokens at the next slots;
runtime/cache_positions.py)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_or_false
from torch import Tensor

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.kv_policy import KVPolicy, all_but_one, best_and_recent
from tokensparse.runtime.static_cache import keep_sinks_and_window_

POSITIONS = ("original", "cache")


@dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024): keep `sinks` first and `window` most recent cache positions.

    positions="original" (the default): kept keys keep their original rotations and new tokens their original
    positions. positions="cache" (the paper's Sec. 3.2): positions within the cache. The cache holds its keys
    before RoPE; each forward reads them rotated to their slots 0..L-1, and its new tokens take the next slots
    (a decode step's query sits at the cache's length), so no position exceeds sinks + window however long
    generation runs, past the model's max_position_embeddings. "cache" needs tokensparse.compile(model, config)
    (which assigns the positions) on a model with rotate-half RoPE (Llama, Qwen2, ...), a DynamicCache
    and prompts of one length (no padding); anything else is a ValueError that names it."""

    sinks: int = 4
    window: int = 1020
    positions: str = "original"
    # Set by tokensparse.compile() for positions="cache": the inverse frequencies of the model's rotary embedding,
    # with which the graph rotates the stored keys to their slots.
    rope: tuple = field(default=(), repr=False)

    name = "streamingllm"

    def __post_init__(self):
        check_int_at_least("sinks", self.sinks, 0)
        check_int_at_least("window", self.window, 1)
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} is unknown: choose one of {list(POSITIONS)} (\"original\": "
                             f"each entry keeps its original RoPE position; \"cache\": positions within the cache, as "
                             f"the paper assigns them)")
        if not (isinstance(self.rope, tuple)
                and all(isinstance(value, numbers.Real) and not isinstance(value, bool) for value in self.rope)):
            raise ValueError(f"rope={self.rope!r} must be a tuple of the rotary embedding's inverse frequencies (set by "
                             f"tokensparse.compile(); leave it out)")

    evicts_each_step = True

    @property
    def at_cache_positions(self) -> bool:
        return self.positions == "cache"

    def keeps_all_up_to(self) -> int:
        return self.sinks + self.window

    def kept_count(self, cache_length: int) -> int:
        return min(cache_length, self.sinks + self.window)

    def evicts(self, query_length: int, cache_length: int) -> bool:
        return cache_length > self.sinks + self.window

    def keep(self, query, keys, scale, count, scores=None, padding=None):
        return streaming_keep(keys, self.sinks, self.window, padding)

    def graph_count(self, queries, length, at_most):
        if isinstance(length, int):
            return super().graph_count(queries, length, at_most)
        if free_unbacked_symbols(length):       # after FastV: min(L, sinks + window), decided at run time
            return at_most(self.sinks + self.window)
        return self.kept_count(length) if guard_or_false(length > self.sinks + self.window) else None

    def graph_selection(self, site):
        return streaming_keep, (site.keys, self.sinks, self.window, site.padding, site.count)

    def static_decode_step(self, buffers, site):
        return KEEP_SINKS_AND_WINDOW, (buffers.keys, buffers.values, buffers.length, self.sinks, self.window,
                                       site.padding), \
            f"keeps {self.sinks} sinks and the last {self.window} filled slots"

    def step_keep(self, length, first_real: torch.Tensor) -> torch.Tensor:
        """A decode step's kept positions [B, min(length, sinks + window)] without a score (streaming_step_keep)."""
        return streaming_step_keep(length, self.sinks, self.window, first_real)


def streaming_keep(keys: torch.Tensor, sinks: int, window: int, padding: Optional[torch.Tensor] = None,
                   count=None) -> torch.Tensor:
    """Kept positions [B, H_kv, count], ascending, of keys [B, H_kv, L]: the first `sinks` and the last
    count - sinks. `count` defaults to sinks + window (for L > sinks + window); min(L, sinks + window) keeps
    every position of a shorter cache, without branching on L (a data-dependent length after FastV). In a
    padded batch (padding [B, L]) the sinks are each sample's first real positions."""
    batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[2]
    count = sinks + window if count is None else count
    if padding is not None:
        earliest_first = -torch.arange(length, device=keys.device, dtype=torch.float32).expand(batch, kv_heads, length)
        return best_and_recent(earliest_first, length, count, window, padding)
    index = torch.arange(count, device=keys.device)
    positions = torch.where(index < sinks, index, index + (length - count))
    return positions.expand(batch, kv_heads, count).contiguous()


def streaming_step_keep(length, sinks: int, window: int, first_real: torch.Tensor) -> torch.Tensor:
    """streaming_keep for a decode step's cache, at most one position over sinks + window, without a branch or a
    sort on its length (a symbol in an exported decode graph, which sort's size checks would guard on): kept
    positions [B, min(length, sinks + window)], ascending, of a cache whose first first_real [B] positions are
    padding. Over the budget, the one position dropped is what streaming_keep ranks last: the last padding
    position among the first sinks + 1, else position `sinks`."""
    dropped = torch.where(first_real > 0, first_real.clamp(max=sinks + 1) - 1, sinks)
    return all_but_one(torch.sym_min(length, sinks + window), length, dropped)


@torch.library.custom_op("tokensparse::keep_sinks_and_window", mutates_args=("keys", "values", "length"))
def keep_sinks_and_window_op(keys: Tensor, values: Tensor, length: Tensor, sinks: int, window: int,
                             padding: Optional[Tensor] = None) -> None:
    """StreamingLLM's eviction on a StaticCache layer's buffers [B, H_kv, max_len, d] and its filled length, in
    place, after a decode step's attention has read them (padding [B, max_len]: the slots holding padding)."""
    keep_sinks_and_window_(keys, values, length, sinks, window, padding)


@keep_sinks_and_window_op.register_fake
def _keep_sinks_and_window_fake(keys, values, length, sinks, window, padding=None):
    return None


KEEP_SINKS_AND_WINDOW = torch.ops.tokensparse.keep_sinks_and_window.default
