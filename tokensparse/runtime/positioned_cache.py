"""DynamicCaches whose layers also carry, per KV head, the position each held entry came from (`positions`
[B, H_kv, L] int64: its column in the whole sequence, a padded batch's padding included, as generate()'s
cache_position counts) and how many positions have entered the layer (`seen`, 0-d int64). An evicted layer
holds positions the policy chose, so a sliding window (Mistral's sliding_window, Gemma's local layers) can
follow its entries only by these positions (fx/passes/sliding_positions.py), not by their place in the cache."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from tokensparse.runtime.scored_cache import BesideKeys, ScoredLayer


def appended_positions(key_states: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, S] int64: the positions of the new keys [B, H_kv, S, d], seen, seen + 1, ..., read from their
    data flow (fx/patterns/kv_cache.py finds them through the ones_like of the new keys)."""
    return torch.ones_like(key_states[:, :, :, 0], dtype=torch.int64).cumsum(-1) + (seen - 1)


class _RecordsPositions(BesideKeys):
    """Appends the positions of each update's new keys beside them."""

    beside = ("positions",)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.tensor([], dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        appended = appended_positions(key_states, self.seen)
        self.positions = torch.cat([self.positions, appended], dim=-1)
        self.seen = appended[0, 0, -1] + 1
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        self.positions, self.seen = None, None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)          # the positions with the keys (BesideKeys)
        if tokens_to_remove < 0 and self.is_initialized:
            self.seen = self.seen - abs(tokens_to_remove)


class PositionedLayer(_RecordsPositions, DynamicLayer):
    """A DynamicLayer that records the positions of its entries."""


class PositionedScoredLayer(_RecordsPositions, ScoredLayer):
    """A ScoredLayer (H2O's scores) that records the positions of its entries."""

    beside = ("scores", "positions")


class PositionedCache(DynamicCache):
    """The cache tokensparse.compile() gives generate() for a KV policy on a model with sliding-window layers:
    every layer is a full one that records its entries' positions, and each sliding-window layer's attention
    sees the entries within the window of each query's position, however many the policy evicted. Pass it as
    past_key_values=tokensparse.PositionedCache() to a forward of tokensparse.compile()'s model by hand (with
    each new token's position_ids: the cache holds fewer entries than positions)."""

    records_positions = True

    def __init__(self, config=None):
        super(DynamicCache, self).__init__(layer_class_to_replicate=PositionedLayer)


class PositionedScoredCache(PositionedCache):
    """The same with H2O's scores."""

    def __init__(self, config=None):
        super(DynamicCache, self).__init__(layer_class_to_replicate=PositionedScoredLayer)


def records_positions(cache) -> bool:
    """Whether `cache` records the positions of its layers' entries (PositionedCache)."""
    return bool(getattr(cache, "records_positions", False))
