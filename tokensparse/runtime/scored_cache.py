"""A DynamicCache that also carries, per layer, KV head and cached position, a float32 score that
policies accumulate across forwards (H2O's column sums of attention). The cache appends a zero score for
each new position; the tokensparse pass adds the forward's attention to it and evicts it with the keys."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer


class BesideKeys:
    """A DynamicLayer mixin for per-position tensors [B, H_kv, L] kept beside the keys (the attributes named in
    `beside`): they follow generate()'s batch operations (beam search, assisted decoding) and a crop of the last
    positions as the keys do."""

    beside: tuple[str, ...] = ()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.is_initialized:
            for name in self.beside:
                setattr(self, name, getattr(self, name)[..., : -abs(tokens_to_remove)])

    def _each_beside(self, change) -> None:
        if self.get_seq_length() > 0:
            for name in self.beside:
                setattr(self, name, change(getattr(self, name)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each_beside(lambda tensor: tensor.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each_beside(lambda tensor: tensor[indices, ...])
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each_beside(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))
        super().reorder_cache(beam_idx)


class ScoredLayer(BesideKeys, DynamicLayer):
    """A DynamicLayer with `scores` [B, H_kv, L] (float32) beside its keys and values."""

    beside = ("scores",)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.scores = torch.tensor([], dtype=torch.float32, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, kv_heads, length = key_states.shape[:3]
        self.scores = torch.cat([self.scores, key_states.new_zeros(batch, kv_heads, length, dtype=torch.float32)],
                                dim=-1)
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        self.scores = None
        super().reset()


class ScoredCache(DynamicCache):
    """The cache for KV policies that accumulate a score per cached position (H2O): pass it to generate()
    as past_key_values=ScoredCache(model.config), or let tokensparse.compile() do it. Full-attention
    layers only: given a config whose layers slide (or are not attention), it says so."""

    def __init__(self, config=None):
        if config is not None:
            text = config.get_text_config(decoder=True)
            others = sorted({kind for kind in getattr(text, "layer_types", None) or () if kind != "full_attention"})
            if others:
                raise ValueError(f"ScoredCache holds full-attention layers only; this model also has {others} layers")
        super(DynamicCache, self).__init__(layer_class_to_replicate=ScoredLayer)


class ScoredStaticLayer(StaticLayer):
    """A StaticLayer with `scores` [B, H_kv, max_len] (float32) beside its fixed key and value buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.scores = torch.zeros(self.batch_size, self.num_heads, self.max_cache_len, dtype=torch.float32,
                                  device=self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.scores)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        # new positions start at score 0 (the slots after the filled ones are 0 already; written so that a
        # compiled graph reads and returns the scores)
        self.scores.index_fill_(2, slots, 0.0)
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        if self.is_initialized:
            self.scores.zero_()
        super().reset()


class ScoredStaticCache(StaticCache):
    """A StaticCache whose layers also carry H2O's accumulated score per slot: pass it to generate() as
    past_key_values=ScoredStaticCache(model.config, max_cache_len) to run H2O without decode recompiles. Full-
    attention layers only."""

    def __init__(self, config, max_cache_len: int):
        text = config.get_text_config(decoder=True)
        others = sorted({kind for kind in getattr(text, "layer_types", None) or () if kind != "full_attention"})
        if others:
            raise ValueError(f"ScoredStaticCache holds full-attention layers only; this model also has {others} "
                             f"layers")
        layers = [ScoredStaticLayer(max_cache_len=max_cache_len) for _ in range(text.num_hidden_layers)]
        super(StaticCache, self).__init__(layers=layers)
