"""Key norm (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): once, after prefill, keep per layer and KV head the positions whose keys have the lowest
L2 norm (they draw the most attention), plus an optional recent window; no attention is computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.kv_policy import PrefillBudget, best_and_recent, check_budget


@dataclass(frozen=True)
class KeyNorm(PrefillBudget):
    """Key norm (Devoto et al., EMNLP 2024): after prefill keep `budget` positions per layer and KV head (an
    int, or a float fraction of the prompt): the `window` most recent ones and the lowest key L2 norms."""

    budget: Union[int, float] = 2048
    window: int = 0

    name = "key_norm"

    def __post_init__(self):
        check_budget("budget", self.budget, 1)
        check_int_at_least("window", self.window, 0)
        self.check_window_fits()

    def keep(self, query, keys, scale, count, scores=None, padding=None):
        return key_norm_keep(keys, count, self.window, padding)

    def graph_selection(self, site):
        return key_norm_keep, (site.keys, site.count, self.window, site.padding)


def key_norm_keep(keys: torch.Tensor, count, window: int, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept positions [B, H_kv, count], ascending, of keys [B, H_kv, L, d]: the last min(window, count)
    positions and the lowest-norm keys before them (ties to the lower position), padding (padding [B, L])
    last."""
    return best_and_recent(-keys.float().norm(dim=-1), keys.shape[2], count, window, padding)
