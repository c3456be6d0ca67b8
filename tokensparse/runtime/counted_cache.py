"""DynamicCaches whose layers also count the positions that ever entered them (`entered`, a 0-d int64 tensor):
with a language-model policy and a KV policy on a padded batch, a layer's padding count depends on how many of
its positions were evicted (entered minus held), and pruning makes `entered` differ from layer to layer."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer

from tokensparse.runtime.scored_cache import ScoredCache, ScoredLayer, ScoredStaticLayer


def appended_count(key_states: torch.Tensor) -> torch.Tensor:
    """0-d int64: how many positions the new keys [B, H_kv, S, d] append, read from their data flow, not their
    traced size (a language-model policy's pass cuts the sequence after dynamo traced the update).
    fx/patterns/kv_cache.py: entered_count finds this in a StaticCache graph."""
    return torch.ones_like(key_states[0, 0, :, 0], dtype=torch.int64).sum()


def held_padding(padding: torch.Tensor, entered: torch.Tensor, held) -> torch.Tensor:
    """[B]: the padding positions a layer holds after a language-model policy pruned it and a KV policy evicted
    from it: max(0, padding - evicted), evicted = entered - held. Pruning keeps every padding position (padding:
    the sample's count) and eviction drops padding first, so what eviction dropped came out of the padding."""
    return (padding - (entered - held)).clamp(min=0)


class _CountsEntries:
    """Counts the positions each update appends (appended_count)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        appended = appended_count(key_states)
        self.entered = appended if getattr(self, "entered", None) is None else self.entered + appended
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        self.entered = None
        super().reset()


class CountedLayer(_CountsEntries, DynamicLayer):
    """A DynamicLayer that counts the positions that entered it."""


class CountedScoredLayer(_CountsEntries, ScoredLayer):
    """A ScoredLayer (H2O's scores) that counts the positions that entered it."""


class CountedCache(DynamicCache):
    """The cache tokensparse.compile() gives generate() for a language-model policy with a KV policy."""

    counts_entries = True

    def __init__(self, config=None):
        super(DynamicCache, self).__init__(layer_class_to_replicate=CountedLayer)


class CountedScoredCache(ScoredCache):
    """The same with H2O's scores."""

    counts_entries = True

    def __init__(self, config=None):
        super().__init__(config)
        self.layer_class_to_replicate = CountedScoredLayer


class _CountsStaticEntries:
    """The same count for a StaticCache layer: a 0-d buffer beside the fixed key and value buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.entered = torch.zeros((), dtype=torch.int64, device=self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.entered)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.entered.add_(appended_count(key_states))
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        if self.is_initialized:
            self.entered.zero_()
        super().reset()


class CountedStaticLayer(_CountsStaticEntries, StaticLayer):
    """A StaticLayer that counts the positions that entered it."""


class CountedScoredStaticLayer(_CountsStaticEntries, ScoredStaticLayer):
    """A ScoredStaticLayer (H2O's scores) that counts the positions that entered it."""


class CountedStaticCache(StaticCache):
    """A StaticCache whose layers count the positions that entered them (and with scores=True carry H2O's scores):
    pass it to generate() as past_key_values=tokensparse.CountedStaticCache(model.config, max_cache_len) to run a
    language-model policy and a KV policy on a padded batch without decode recompiles. Full-attention layers
    only."""

    counts_entries = True

    def __init__(self, config, max_cache_len: int, scores: bool = False):
        text = config.get_text_config(decoder=True)
        others = sorted({kind for kind in getattr(text, "layer_types", None) or () if kind != "full_attention"})
        if others:
            raise ValueError(f"CountedStaticCache holds full-attention layers only; this model also has {others} "
                             f"layers")
        layer = CountedScoredStaticLayer if scores else CountedStaticLayer
        super(StaticCache, self).__init__(layers=[layer(max_cache_len=max_cache_len)
                                                  for _ in range(text.num_hidden_layers)])
