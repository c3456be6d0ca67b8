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


def slot_causal_mask(slots: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """[1, 1, q, max_len] bool: query i (written at slot slots[i]) sees the filled slots up to its own. After
    eviction the slots no longer equal the tokens' positions, so generate()'s position-based mask is wrong."""
    columns = torch.arange(buffer.shape[2], device=buffer.device)
    return (columns[None, :] <= slots[:, None])[None, None]


def keep_sinks_and_window_(keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, sinks: int,
                           window: int) -> None:
    """StreamingLLM on a StaticCache layer, in place: once its `length` filled slots outnumber sinks + window,
    move the first `sinks` and the last `window` of them to the first slots, clear the rest, and set the length
    to sinks + window (so the next step writes right after them)."""
    from tokensparse.policies.streamingllm import streaming_keep

    filled = int(length.max())
    if filled > sinks + window:
        _move_to_front((keys, values), streaming_keep(keys[:, :, :filled], sinks, window), filled, length)


def first_slots(slots: torch.Tensor, new_keys: torch.Tensor) -> torch.Tensor:
    """The first of the slots [S] a StaticCache layer would write, one per new key [B, H, S', d] (S' <= S): a
    pruned layer writes its kept tokens to consecutive slots."""
    return slots[: new_keys.shape[2]]


def heavy_and_recent_(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, length: torch.Tensor,
                      q: torch.Tensor, scale: float, budget: int, recent: int) -> None:
    """H2O on a ScoredStaticCache layer, in place, after a decode step's attention: add the step's attention
    (queries q [B, H, S, d] over the filled slots) to the scores; once the filled slots outnumber `budget`, move
    each KV head's `recent` last and `budget - recent` best-scored slots to the front (in order), clear the
    rest, and set the length to `budget`."""
    from tokensparse.policies.h2o import h2o_keep
    from tokensparse.policies.kv_policy import attention_column_sums

    filled = int(length.max())
    scores[:, :, :filled] += attention_column_sums(q, keys[:, :, :filled], scale)
    if filled <= budget:
        return
    _move_to_front((keys, values, scores), h2o_keep(scores[:, :, :filled], budget, recent), filled, length)


def _move_to_front(buffers: tuple, kept: torch.Tensor, filled: int, length: torch.Tensor) -> None:
    """In place: each buffer's slots `kept` [B, H_kv, k] (of its `filled` ones) become its first k slots, the
    other filled slots are cleared, and the layer's length becomes k."""
    count = kept.shape[2]
    for buffer in buffers:
        index = kept if buffer.dim() == 3 else kept.unsqueeze(-1).expand(-1, -1, -1, buffer.shape[-1])
        buffer[:, :, :count] = buffer[:, :, :filled].gather(2, index)
        buffer[:, :, count:filled] = 0
    length.fill_(count)
