"""Plain-PyTorch helpers that the eviction pass splices into graphs that write a transformers StaticCache
(fixed [B, H_kv, max_len, d] buffers filled at slot cumulative_length): the evicted buffers, their new
length, and decode masks over the buffer's slots."""

from __future__ import annotations

import torch


def refill_buffer(kept: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like `buffer` (keys or values [B, H, max_len, d], scores [B, H, max_len]) whose first slots
    hold `kept` ([B, H, k, ...]), the rest 0."""
    empty = buffer.shape[2] - kept.shape[2]
    return torch.cat([kept, kept.new_zeros(*kept.shape[:2], empty, *kept.shape[3:])], dim=2)


def filled_length(kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The cache layer's cumulative_length after eviction: kept.shape[2], as a tensor like `like`."""
    return torch.full_like(like, kept.shape[2])


def slot_causal_mask(slots: torch.Tensor, buffer: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """[1 or B, 1, q, max_len] bool: query i (written at slot slots[i]) sees the filled slots up to its own, except
    those holding a padded batch's padding (padding [B, max_len], from slot_padding). After eviction or pruning
    the slots no longer equal the tokens' positions, so generate()'s position-based mask is wrong."""
    columns = torch.arange(buffer.shape[2], device=buffer.device)
    mask = (columns[None, :] <= slots[:, None])[None, None]
    return mask if padding is None else mask & ~padding[:, None, None, :]


def slot_padding(slots: torch.Tensor, buffer: torch.Tensor, position_mask: torch.Tensor, evicted: bool,
                 entered: torch.Tensor | None = None) -> torch.Tensor:
    """[B, max_len] bool: which slots of a StaticCache layer hold a left-padded batch's padding, from a causal mask
    over positions [B, 1, q, max_len] (bool, True where allowed, or additive float; runtime/static_decode_masks.py
    hands decode steps one) whose last row is the last query's (slots[-1]). Padding comes first in every layer: the
    policies keep positions in order.
    - A pruned layer (FastV and the other language-model policies never drop padding; `evicted` False) holds
      all of it: as many slots as the positions before the first one the last query may see (the mask covers
      positions from 0).
    - An evicted layer (`evicted` True): the KV policies rank padding below every real position, so a layer
      holds padding only when it holds every real position seen, and then in its remaining slots. The mask's
      real positions count them (or, when it covers only the last max_len positions, at least as many as the
      layer's filled slots, and then it holds no padding).
    - A layer pruned and then evicted (a language-model policy and a KV policy): eviction drops padding first,
      so it holds max(0, padding - evicted), evicted = `entered` (the positions that ever entered it, counted by
      runtime/counted_cache.py) - its filled slots. This form holds for the two above too."""
    from tokensparse.policies.fastv import attended
    from tokensparse.runtime.counted_cache import held_padding

    allowed = attended(position_mask[:, 0, -1, :])
    padding = allowed.int().argmax(dim=-1)          # left padding: the first position the query may see
    if entered is not None:
        count = held_padding(padding, entered, slots[-1] + 1)
    elif evicted:
        count = (slots[-1] + 1 - allowed.sum(dim=-1)).clamp(min=0)
    else:
        count = padding
    columns = torch.arange(buffer.shape[2], device=buffer.device)
    return columns[None, :] < count[:, None]


def keep_sinks_and_window_(keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, sinks: int,
                           window: int, padding: torch.Tensor | None = None) -> None:
    """StreamingLLM on a StaticCache layer, in place: once its `length` filled slots outnumber sinks + window,
    move the first `sinks` and the last `window` of them to the first slots, clear the rest, and set the length
    to sinks + window (so the next step writes right after them). In a padded batch (padding [B, max_len], the
    slots holding padding) the sinks are each sample's first real slots."""
    from tokensparse.policies.streamingllm import streaming_keep

    filled = int(length.max())
    if filled > sinks + window:
        _move_to_front((keys, values), streaming_keep(keys[:, :, :filled], sinks, window, _filled(padding, filled)),
                       filled, length)


def first_columns(tensor: torch.Tensor, q: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` cut along `dim` to as many entries as the queries q [B, H, S, d]: a prefill's keys (or mask columns)
    read from a StaticCache buffer that it filled from slot 0."""
    return tensor.narrow(dim, 0, q.shape[2])


def first_slots(slots: torch.Tensor, new_keys: torch.Tensor) -> torch.Tensor:
    """The first of the slots [S] a StaticCache layer would write, one per new key [B, H, S', d] (S' <= S): a
    pruned layer writes its kept tokens to consecutive slots."""
    return slots[: new_keys.shape[2]]


def heavy_and_recent_(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, length: torch.Tensor,
                      q: torch.Tensor, scale: float, budget: int, recent: int,
                      padding: torch.Tensor | None = None) -> None:
    """H2O on a ScoredStaticCache layer, in place, after a decode step's attention: add the step's attention
    (queries q [B, H, S, d] over the filled slots) to the scores; once the filled slots outnumber `budget`, move
    each KV head's `recent` last and `budget - recent` best-scored slots to the front (in order), clear the
    rest, and set the length to `budget`. Slots holding a padded batch's padding (padding [B, max_len]) draw no
    attention and rank below every other slot."""
    from tokensparse.policies.h2o import h2o_keep
    from tokensparse.policies.kv_policy import attention_column_sums

    filled = int(length.max())
    padding = _filled(padding, filled)
    scores[:, :, :filled] += attention_column_sums(q, keys[:, :, :filled], scale, padding)
    if filled <= budget:
        return
    _move_to_front((keys, values, scores), h2o_keep(scores[:, :, :filled], budget, recent, padding), filled, length)


def _filled(padding: torch.Tensor | None, filled: int) -> torch.Tensor | None:
    """The padding flags [B, filled] of the filled slots, or None for an unpadded batch."""
    return None if padding is None else padding[:, :filled]


def _move_to_front(buffers: tuple, kept: torch.Tensor, filled: int, length: torch.Tensor) -> None:
    """In place: each buffer's slots `kept` [B, H_kv, k] (of its `filled` ones) become its first k slots, the
    other filled slots are cleared, and the layer's length becomes k."""
    count = kept.shape[2]
    for buffer in buffers:
        index = kept if buffer.dim() == 3 else kept.unsqueeze(-1).expand(-1, -1, -1, buffer.shape[-1])
        buffer[:, :, :count] = buffer[:, :, :filled].gather(2, index)
        buffer[:, :, count:filled] = 0
    length.fill_(count)
