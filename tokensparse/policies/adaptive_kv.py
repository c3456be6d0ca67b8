"""Adaptive KV budgets (ZipVL, He et al., 2024): once, after prefill, each layer keeps the fewest positions
that hold a fraction `tau` of the attention mass of the last `window` queries (the probe queries), plus the
window itself; the kept count depends on the data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tokensparse.policies.base import check_fraction, check_int_at_least
from tokensparse.policies.kv_policy import KVPolicy, attention_column_sums, kept_positions, score_ranks
from tokensparse.policies.op_shapes import data_dependent_count


@dataclass(frozen=True)
class AdaptiveKV(KVPolicy):
    """ZipVL's adaptive budget (He et al., 2024): per layer, the smallest count p such that every KV head's
    window plus its top positions hold at least `tau` of the window queries' attention mass; every head of
    the layer keeps p positions (so the cache stays rectangular), the window included."""

    tau: float = 0.9
    window: int = 32

    name = "adaptive"
    count_from_selection = True

    def __post_init__(self):
        check_fraction("tau", self.tau)
        check_int_at_least("window", self.window, 1)

    def kept_count(self, cache_length: int):
        return None                                   # data-dependent: known only from the attention

    def evicts(self, query_length: int, cache_length: int) -> bool:
        # Once, after prefill (more than one query), and only when something could go.
        return query_length > 1 and self.tau < 1 and cache_length > self.window

    def keep(self, query, keys, scale, count=None, scores=None, padding=None):
        return adaptive_keep(query, keys, scale, self.tau, self.window, padding)

    def keeps_all_up_to(self) -> int:
        return self.window

    def graph_selection(self, site):
        return ADAPTIVE_KEEP, (site.query, site.keys, site.scale(), self.tau, self.window, site.padding)

    def is_identity(self, depth: int) -> bool:
        return self.tau == 1.0


def needed_before_window(mass: torch.Tensor, window: int, tau: float) -> torch.Tensor:
    """0-d: the most positions before the window that any (sample, KV head) needs so that its kept mass reaches
    tau of its total, mass [B, H_kv, L]. The layer keeps the window plus that many."""
    length = mass.shape[-1]
    before, recent = mass[..., : length - window], mass[..., length - window:].sum(dim=-1, keepdim=True)
    target = tau * mass.sum(dim=-1, keepdim=True)
    reached = before.sort(dim=-1, descending=True).values.cumsum(dim=-1) + recent      # [B, H_kv, L - w]
    needed = torch.where(recent >= target, 0, (reached < target).sum(dim=-1, keepdim=True) + 1)
    return needed.clamp(max=length - window).max()


def adaptive_keep(q: torch.Tensor, keys: torch.Tensor, scale: float, tau: float, window: int,
                  padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept positions [B, H_kv, p], ascending: the last min(window, L) positions and each head's p - window
    most-attended positions before them (ties to the lower position), p from needed_before_window; padding
    (padding [B, L], which holds no mass) last. q [B, H, S, d]. The count is never read into Python (each head
    keeps the ranks below it), so that torch.export and ONNX trace this function as it is."""
    batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[2]
    window = torch.sym_min(torch.sym_min(window, length), q.shape[2])     # data-dependent after FastV: no guard
    mass = attention_column_sums(q[:, :, -window:], keys, scale, padding)
    before = mass[..., : length - window]
    if padding is not None:
        before = before.masked_fill(padding[:, None, : length - window], -math.inf)
    kept = score_ranks(before) < needed_before_window(mass, window, tau)
    return kept_positions(torch.cat([kept, kept.new_ones(batch, kv_heads, window)], dim=-1))


@torch.library.custom_op("tokensparse::adaptive_keep", mutates_args=())
def adaptive_keep_op(q: Tensor, keys: Tensor, scale: float, tau: float, window: int,
                     padding: Optional[Tensor] = None) -> Tensor:
    """ZipVL's kept cache positions [B, H_kv, p]: p, data-dependent, is the fewest that hold `tau` of the last
    `window` queries' attention mass in every KV head (padding [B, L] holds none and is kept last)."""
    return adaptive_keep(q, keys, scale, tau, window, padding)


@adaptive_keep_op.register_fake
def _adaptive_keep_fake(q, keys, scale, tau, window, padding=None):
    return keys.new_empty(keys.shape[0], keys.shape[1], data_dependent_count(), dtype=torch.int64)


ADAPTIVE_KEEP = torch.ops.tokensparse.adaptive_keep.default
