"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): per layer and KV head, accumulate each cached
position's attention (column sums over every query so far: the prefill's, then each decode step's new row)
and keep the `heavy` top-scoring positions plus the `recent` most recent ones; evict the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_or_false
from torch import Tensor

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.kv_policy import KVPolicy, all_but_one, best_and_recent, is_prefill
from tokensparse.runtime.static_cache import heavy_and_recent_


@dataclass(frozen=True)
class H2O(KVPolicy):
    """H2O (Zhang et al., NeurIPS 2023): keep `heavy` heavy hitters (by accumulated attention) and the
    `recent` most recent positions per layer and KV head, at every forward whose cache holds more. Needs a
    cache that carries the scores (tokensparse.ScoredCache; tokensparse.compile() supplies it)."""

    heavy: int = 128
    recent: int = 128

    name = "h2o"
    scored = True
    evicts_each_step = True

    def __post_init__(self):
        check_int_at_least("heavy", self.heavy, 0)
        check_int_at_least("recent", self.recent, 1)

    def kept_count(self, cache_length: int) -> int:
        return min(cache_length, self.heavy + self.recent)

    def evicts(self, query_length: int, cache_length: int) -> bool:
        return cache_length > self.heavy + self.recent

    def keep(self, query, keys, scale, count, scores=None, padding=None):
        return h2o_keep(scores, count, self.recent, padding)

    def keeps_all_up_to(self) -> int:
        return self.heavy + self.recent

    def graph_count(self, queries, length, at_most):
        if isinstance(length, int):
            return super().graph_count(queries, length, at_most)
        budget = self.heavy + self.recent
        if free_unbacked_symbols(length) or not is_prefill(queries):
            # after FastV, or a decode step's symbolic length: min(L, budget), decided at run time, unguarded
            return at_most(budget)
        return budget if guard_or_false(length > budget) else None

    def graph_selection(self, site):
        keep = H2O_KEEP if site.prefill else H2O_STEP_KEEP          # a decode step drops at most one
        return keep, (site.scores, site.count, self.recent, site.padding)

    def static_decode_step(self, buffers, site):
        return HEAVY_AND_RECENT, (buffers.keys, buffers.values, buffers.scores, buffers.length, site.query,
                                  site.scale(), self.heavy + self.recent, self.recent, site.padding), \
            f"accumulates the step's attention and keeps {self.heavy} heavy and {self.recent} recent slots"


def h2o_keep(scores: torch.Tensor, count: int, recent: int, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H2O's kept positions [B, H_kv, count], ascending, from accumulated scores [B, H_kv, L]: the last
    `recent` positions and the `count - recent` heavy hitters before them, padding (padding [B, L]) last."""
    return best_and_recent(scores, scores.shape[-1], count, recent, padding)


def h2o_step_keep(scores: torch.Tensor, count, recent: int, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h2o_keep for a decode step's cache, at most one position over `count`, without a sort or a branch on its
    length (a symbol in an exported decode graph, which a sort's size checks would guard on): of the positions
    before the recent window, the one h2o_keep ranks last is dropped (the lowest score, ties to the later
    position; padding first, the latest of it)."""
    length = scores.shape[-1]
    recent = torch.sym_min(torch.sym_min(recent, count), length)
    positions = torch.arange(length, device=scores.device)
    ranked = scores.float()
    if padding is not None:
        ranked = ranked.masked_fill(padding[:, None, :], -float("inf"))
    ranked = ranked.masked_fill(positions >= length - recent, float("inf"))      # the recent window stays
    lowest = ranked.amin(dim=-1, keepdim=True)
    return all_but_one(count, length, torch.where(ranked == lowest, positions, -1).amax(dim=-1))


@torch.library.custom_op("tokensparse::h2o_keep", mutates_args=())
def h2o_keep_op(scores: Tensor, count: int, recent: int, padding: Optional[Tensor] = None) -> Tensor:
    """H2O's kept cache positions [B, H_kv, count] from accumulated scores [B, H_kv, L] (padding [B, L]
    kept last)."""
    return h2o_keep(scores, count, recent, padding)


@h2o_keep_op.register_fake
def _h2o_keep_fake(scores, count, recent, padding=None):
    return scores.new_empty(scores.shape[0], scores.shape[1], count, dtype=torch.int64)


@torch.library.custom_op("tokensparse::h2o_step_keep", mutates_args=())
def h2o_step_keep_op(scores: Tensor, count: int, recent: int, padding: Optional[Tensor] = None) -> Tensor:
    """h2o_keep at a decode step: without a sort while the cache [B, H_kv, L] is at most one position over
    `count` (as every decode step's is), else h2o_keep itself."""
    if scores.shape[-1] > count + 1:
        return h2o_keep(scores, count, recent, padding)
    return h2o_step_keep(scores, count, recent, padding)


@h2o_step_keep_op.register_fake
def _h2o_step_keep_fake(scores, count, recent, padding=None):
    return scores.new_empty(scores.shape[0], scores.shape[1], count, dtype=torch.int64)


@torch.library.custom_op("tokensparse::heavy_and_recent", mutates_args=("keys", "values", "scores", "length"))
def heavy_and_recent_op(keys: Tensor, values: Tensor, scores: Tensor, length: Tensor, q: Tensor, scale: float,
                        budget: int, recent: int, padding: Optional[Tensor] = None) -> None:
    """H2O's accumulation and eviction on a ScoredStaticCache layer's buffers and length, in place, after a
    decode step's attention has read them (padding [B, max_len]: the slots holding padding)."""
    heavy_and_recent_(keys, values, scores, length, q, scale, budget, recent, padding)


@heavy_and_recent_op.register_fake
def _heavy_and_recent_fake(keys, values, scores, length, q, scale, budget, recent, padding=None):
    return None


H2O_KEEP = torch.ops.tokensparse.h2o_keep.default
H2O_STEP_KEEP = torch.ops.tokensparse.h2o_step_keep.default
HEAVY_AND_RECENT = torch.ops.tokensparse.heavy_and_recent.default
