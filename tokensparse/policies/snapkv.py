"""SnapKV (Li et al., 2024): once, after prefill, keep per layer and KV head the prompt positions that the
last `window` queries attend to most (summed over the window, 1-D pooled along the sequence, averaged
over the query heads of each KV group), plus the window itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.kv_policy import PrefillBudget, attention_column_sums, best_and_recent, check_budget

POOLINGS = ("avg", "max")


def check_window_scoring(window: int, kernel: int, pooling: str) -> None:
    """SnapKV's scoring options: the observation window, an odd pooling kernel, avg or max pooling."""
    check_int_at_least("window", window, 1)
    check_int_at_least("kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel={kernel} must be odd, so that pooling keeps every position centred")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is unknown: choose one of {list(POOLINGS)}")


@dataclass(frozen=True)
class SnapKV(PrefillBudget):
    """SnapKV (Li et al., 2024): after prefill keep `budget` positions per layer and KV head (an int, or a
    float fraction of the prompt), chosen by the pooled attention of the last `window` queries; the window
    is always kept."""

    budget: Union[int, float] = 2048
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    name = "snapkv"

    def __post_init__(self):
        check_budget("budget", self.budget, 1)
        check_window_scoring(self.window, self.kernel, self.pooling)
        self.check_window_fits()

    def keep(self, query, keys, scale, count, scores=None, padding=None):
        return snapkv_keep(query, keys, scale, count, self.window, self.kernel, self.pooling, padding)

    def graph_selection(self, site):
        return SNAPKV_KEEP, (site.query, site.keys, site.scale(), site.count, self.window, self.kernel, self.pooling,
                             site.padding)


def snapkv_scores(q_window: torch.Tensor, keys: torch.Tensor, scale: float, kernel: int = 5,
                  pooling: str = "avg", padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, H_kv, L - w] scores of the positions before the window: the attention the last w queries
    q_window [B, H, w, d] (causal, at positions L-w..L-1) give keys [B, H_kv, L, d], summed over the window,
    averaged over each KV group's query heads, then pooled along the sequence (odd `kernel`). Padding
    positions (padding [B, L]) draw no attention and ask none."""
    batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[2]
    window = q_window.shape[2]
    scores = attention_column_sums(q_window, keys, scale, padding)[..., : length - window]      # [B, H_kv, L - w]
    flat = scores.reshape(batch * kv_heads, 1, length - window)
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(batch, kv_heads, length - window)


def snapkv_keep(q: torch.Tensor, keys: torch.Tensor, scale: float, count: int, window: int, kernel: int = 5,
                pooling: str = "avg", padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept positions [B, H_kv, count], ascending: the last min(window, L) positions and the best-scored
    positions before them (ties to the lower position), padding (padding [B, L]) last. q [B, H, S, d] are
    the forward's queries."""
    length = keys.shape[2]
    # a length that depends on the data (after FastV, in an export) must not be guarded on: sym_min, and the
    # short form only where count <= window is known (the general form keeps the same positions then)
    window = torch.sym_min(torch.sym_min(window, length), q.shape[2])
    if guard_or_false(count <= window):
        return torch.arange(length - count, length, device=keys.device).expand(*keys.shape[:2], count).contiguous()
    scores = snapkv_scores(q[:, :, -window:], keys, scale, kernel, pooling, padding)
    return best_and_recent(scores, length, count, window, padding)


@torch.library.custom_op("tokensparse::snapkv_keep", mutates_args=())
def snapkv_keep_op(q: Tensor, keys: Tensor, scale: float, count: int, window: int, kernel: int,
                   pooling: str, padding: Optional[Tensor] = None) -> Tensor:
    """SnapKV's kept cache positions [B, H_kv, count] from the forward's queries q [B, H, S, d] and the
    cache's keys [B, H_kv, L, d] (padding [B, L]: a padded batch's padding, kept last)."""
    return snapkv_keep(q, keys, scale, count, window, kernel, pooling, padding)


@snapkv_keep_op.register_fake
def _snapkv_keep_fake(q, keys, scale, count, window, kernel, pooling, padding=None):
    return keys.new_empty(keys.shape[0], keys.shape[1], count, dtype=torch.int64)


SNAPKV_KEEP = torch.ops.tokensparse.snapkv_keep.default
