"""Plain-PyTorch helpers that the language-model pass splices into graphs: the vision mask in [B, S]
form, and gathering every token-indexed tensor by the kept positions."""

from __future__ import annotations

import torch


def vision_mask_2d(*masks: torch.Tensor) -> torch.Tensor:
    """The merges' image (and video) masks ([B, S], or [B, S, D] / [B, S, 1] broadcast over features) as one
    [B, S] bool: where any of them holds a vision token."""
    union = None
    for mask in masks:
        while mask.dim() > 2:
            mask = mask[..., 0]
        union = mask.bool() if union is None else union | mask.bool()
    return union


def span_mask(like: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[B, S] bool, True at positions start..end-1, for a sequence tensor `like` [B, S, ...]."""
    positions = torch.arange(like.shape[1], device=like.device)
    return ((positions >= start) & (positions < end)).unsqueeze(0).expand(like.shape[0], -1)


def gather_tokens(x: torch.Tensor, kept: torch.Tensor, axes: tuple) -> torch.Tensor:
    """x with each token axis in `axes` reduced to the kept positions kept [B, S'] (per sample). A
    batch axis of size 1 (RoPE tables shared by the batch) is expanded to B first."""
    batch, count = kept.shape
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    for axis in axes:
        shape = [1] * x.dim()
        shape[0], shape[axis] = batch, count
        index = kept.view(shape).expand(*[count if d == axis else x.shape[d] for d in range(x.dim())])
        x = x.gather(axis, index)
    return x


def last_tokens(x: torch.Tensor, kept: torch.Tensor, axes: tuple) -> torch.Tensor:
    """x with each token axis in `axes` cut to its last S' rows, S' = kept.shape[1]. For RoPE tables under
    positions="compact": the kept tokens take the last S' positions of the prompt, consecutive and ending
    where the prompt ends, so decode steps continue at generate()'s own positions. Attention depends only on
    the distance between RoPE positions, so this equals renumbering the kept tokens from 0 and shifting each
    decode step back by the number of tokens dropped before that layer."""
    count = kept.shape[1]
    for axis in axes:
        x = x.narrow(axis, x.shape[axis] - count, count)
    return x
