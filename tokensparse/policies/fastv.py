"""FastV (Chen et al., ECCV 2024): at decoder layer K keep every text token and the image tokens that
received the most attention in layer K-1 (mean over heads), from the last prompt token (the authors'
code) or from all text tokens (the paper). Plain PyTorch step functions; the language-model pass that
splices them in comes with the VLM issue."""

from __future__ import annotations

import math

import torch

QUERIES = ("last", "text")


def fastv_scores(q: torch.Tensor, k: torch.Tensor, scale: float, image_mask: torch.Tensor,
                 query: str = "last") -> torch.Tensor:
    """Attention received by each position [B, S] from the chosen query rows, mean over heads (and rows),
    causal; recomputed from q [B, H, S, d] and k [B, H_kv, S, d] for those rows only."""
    if query not in QUERIES:
        raise ValueError(f"query={query!r} is not one of {QUERIES}")
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    sequence = q.shape[2]
    if query == "last":
        rows = q[:, :, -1:]
        logits = rows @ k.transpose(-1, -2) * scale                                   # [B, H, 1, S]
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]
    logits = q @ k.transpose(-1, -2) * scale                                          # all rows, then keep text rows
    causal = torch.ones(sequence, sequence, dtype=torch.bool, device=q.device).tril()
    return text_row_mean(logits.masked_fill(~causal, -math.inf).softmax(dim=-1), image_mask)


def text_row_mean(probabilities: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Attention received [B, S]: probabilities [B, H, S, S] averaged over heads and over the text rows."""
    probabilities = probabilities.mean(dim=1)
    text_rows = (~image_mask).to(probabilities.dtype).unsqueeze(-1)
    return (probabilities * text_rows).sum(dim=1) / text_rows.sum(dim=1).clamp_min(1)


def kept_image_count(image_tokens: int, keep: float) -> int:
    """round(keep * N_vision), at least one."""
    return max(1, min(image_tokens, round(keep * image_tokens)))


def fastv_keep(scores: torch.Tensor, image_mask: torch.Tensor, keep: float) -> torch.Tensor:
    """Positions [B, S'] kept from layer K on, ascending: every text position and the best-scored
    image positions. Every sample must hold the same number of image tokens."""
    counts = image_mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"samples hold different numbers of image tokens ({counts.tolist()}); FastV needs equal "
                         f"counts per batch")
    image_tokens = int(counts[0])
    best = scores.masked_fill(~image_mask, -math.inf).topk(kept_image_count(image_tokens, keep), dim=-1).indices
    kept = ~image_mask
    kept = kept.scatter(1, best, True)
    return kept.nonzero()[:, 1].view(scores.shape[0], -1)
