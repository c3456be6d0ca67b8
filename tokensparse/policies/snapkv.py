"""SnapKV (Li et al., 2024): once, after prefill, keep per layer and KV head the prompt positions that the
last `window` queries attend to most (summed over the window, 1-D pooled along the sequence, averaged
over the query heads of each KV group), plus the window itself."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.kv_policy import KVPolicy, attention_column_sums, best_and_recent

POOLINGS = ("avg", "max")


@dataclass(frozen=True)
class SnapKV(KVPolicy):
    """SnapKV (Li et al., 2024): after prefill keep `budget` positions per layer and KV head (an int, or a
    float fraction of the prompt), chosen by the pooled attention of the last `window` queries; the window
    is always kept."""

    budget: Union[int, float] = 2048
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    name = "snapkv"

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real):
            raise ValueError(f"budget={self.budget!r} must be a count of positions (int >= 1) or a fraction in (0, 1]")
        if isinstance(self.budget, numbers.Integral):
            check_int_at_least("budget", self.budget, 1)
        elif not 0 < self.budget <= 1:
            raise ValueError(f"budget={self.budget!r} is out of range: a fraction must be in (0, 1] (or give a count)")
        check_int_at_least("window", self.window, 1)
        check_int_at_least("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be odd, so that pooling keeps every position centred")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is unknown: choose one of {list(POOLINGS)}")

    def kept_count(self, cache_length: int) -> int:
        wanted = self.budget if isinstance(self.budget, numbers.Integral) else round(self.budget * cache_length)
        return min(cache_length, max(wanted, self.window))

    def evicts(self, query_length: int, cache_length: int) -> bool:
        # Once, after prefill: the forward that reads the whole prompt (more than one query).
        return query_length > 1 and self.kept_count(cache_length) < cache_length

    def keep(self, query, keys, scale, count, scores=None):
        return snapkv_keep(query, keys, scale, count, self.window, self.kernel, self.pooling)

    def is_identity(self, depth: int) -> bool:
        return isinstance(self.budget, float) and self.budget == 1.0


def snapkv_scores(q_window: torch.Tensor, keys: torch.Tensor, scale: float, kernel: int = 5,
                  pooling: str = "avg") -> torch.Tensor:
    """[B, H_kv, L - w] scores of the positions before the window: the attention the last w queries
    q_window [B, H, w, d] (causal, at positions L-w..L-1) give keys [B, H_kv, L, d], summed over the window,
    averaged over each KV group's query heads, then pooled along the sequence (odd `kernel`)."""
    batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[2]
    window = q_window.shape[2]
    scores = attention_column_sums(q_window, keys, scale)[..., : length - window]      # [B, H_kv, L - w]
    flat = scores.reshape(batch * kv_heads, 1, length - window)
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(batch, kv_heads, length - window)


def snapkv_keep(q: torch.Tensor, keys: torch.Tensor, scale: float, count: int, window: int, kernel: int = 5,
                pooling: str = "avg") -> torch.Tensor:
    """Kept positions [B, H_kv, count], ascending: the last min(window, L) positions and the best-scored
    positions before them (ties to the lower position). q [B, H, S, d] are the forward's queries."""
    length = keys.shape[2]
    window = min(window, length, q.shape[2])
    if count <= window:
        return torch.arange(length - count, length, device=keys.device).expand(*keys.shape[:2], count).contiguous()
    return best_and_recent(snapkv_scores(q[:, :, -window:], keys, scale, kernel, pooling), length, count, window)
