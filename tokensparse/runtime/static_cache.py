"""Plain-PyTorch helpers that the eviction pass splices into graphs that write a transformers StaticCache
(fixed [B, H_kv, max_len, d] buffers filled at slot cumulative_length): the evicted buffers, their new
length, and decode masks over the buffer's slots."""

from __future__ import annotations

import torch


def refill_buffer(kept: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like `buffer` [B, H, max_len, d] whose first slots hold `kept` [B, H, k, d], the rest 0."""
    empty = buffer.shape[2] - kept.shape[2]
    return torch.cat([kept, kept.new_zeros(kept.shape[0], kept.shape[1], empty, kept.shape[3])], dim=2)


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
    filled = int(length.max())
    budget = sinks + window
    if filled <= budget:
        return
    kept = torch.cat([torch.arange(sinks, device=keys.device), torch.arange(filled - window, filled,
                                                                             device=keys.device)])
    for buffer in (keys, values):
        buffer[:, :, :budget] = buffer[:, :, kept]
        buffer[:, :, budget:filled] = 0
    length.fill_(budget)
