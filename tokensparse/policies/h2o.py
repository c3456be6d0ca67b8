"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): per layer and KV head, accumulate each cached
position's attention (column sums over every query so far: the prefill's, then each decode step's new row)
and keep the `heavy` top-scoring positions plus the `recent` most recent ones; evict the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.kv_policy import KVPolicy, all_but_one, best_and_recent


@dataclass(frozen=True)
class H2O(KVPolicy):
    """H2O (Zhang et al., NeurIPS 2023): keep `heavy` heavy hitters (by accumulated attention) and the
    `recent` most recent positions per layer and KV head, at every forward whose cache holds more. Needs a
    cache that carries the scores (tokensparse.ScoredCache; tokensparse.compile() supplies it)."""

    heavy: int = 128
    recent: int = 128

    name = "h2o"
    scored = True

    def __post_init__(self):
        check_int_at_least("heavy", self.heavy, 0)
        check_int_at_least("recent", self.recent, 1)

    def kept_count(self, cache_length: int) -> int:
        return min(cache_length, self.heavy + self.recent)

    def evicts(self, query_length: int, cache_length: int) -> bool:
        return cache_length > self.heavy + self.recent

    def keep(self, query, keys, scale, count, scores=None, padding=None):
        return h2o_keep(scores, count, self.recent, padding)


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
