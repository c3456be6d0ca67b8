"""Attention-rank token pruning (EViT, Liang et al., ICLR 2022; FoPru's "rank" strategy).

Plain PyTorch: the policy's eager reference and the code the prune pass splices into graphs.
Scores are recomputed from the block's q and k for the query rows needed; the full attention matrix
is never materialised (without a CLS token, query rows are processed in chunks).
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils import flop_counter

from tokensparse.policies.base import Policy, check_fraction, check_int_at_least, checked_layers, recorder
from tokensparse.policies.op_shapes import token_count
from tokensparse.policies.selection import top_k_in_order
from tokensparse.policies.tower_step import KEYS, MASK, QUERY, SCALE, X, CountOfTokens, TowerStep

QUERY_CHUNK = 128


@dataclass(frozen=True)
class TopK(Policy):
    """EViT-style attention-rank pruning (Liang et al., ICLR 2022): keep the most-attended tokens."""

    layers: Sequence[int] = (3, 6, 9)
    keep: float = 0.7
    fuse: bool = False
    prefix_tokens: Optional[int] = None

    name = "topk"

    def __post_init__(self):
        object.__setattr__(self, "layers", checked_layers("layers", self.layers, 0, "block index"))
        check_fraction("keep", self.keep)
        if self.prefix_tokens is not None:
            check_int_at_least("prefix_tokens", self.prefix_tokens, 0)

    def check_depth(self, depth: int) -> None:
        past = [layer for layer in self.layers if layer >= depth]
        if past:
            raise ValueError(f"layers={list(self.layers)}: block {past[0]} is past the model's depth "
                             f"({depth} blocks, valid indices 0..{depth - 1})")

    def is_identity(self, depth: int) -> bool:
        return self.keep == 1.0 and not self.fuse

    def tower_step(self, index: int, depth: int, tokens: int, prefix: int) -> Optional[TowerStep]:
        if index not in self.layers:
            return None
        keep = CountOfTokens(kept_count, (prefix, self.keep), tokens)
        after = prefix + keep.value + int(self.fuse)
        return TowerStep("prune_tokens", TOPK_PRUNE, topk_step, (X, QUERY, KEYS, SCALE, keep, prefix, self.fuse, MASK),
                         after, sized=False, note=f"keep {after} of {tokens} tokens")


def kept_count(tokens, protected: int, keep: float):
    """Patch tokens kept of the n >= 1 after the protected prefix: ceil(keep * n), keep read as the fraction the
    user wrote (the nearest with a denominator up to 10^6), so 1 <= kept <= n. Integer arithmetic: a symbolic
    count gives its symbolic expression."""
    fraction = Fraction(keep).limit_denominator(10**6) or Fraction(keep)
    patches = tokens - protected
    return (fraction.numerator * patches + fraction.denominator - 1) // fraction.denominator


def attention_received(q, k, scale: float, protected: int, attn_mask=None, query_chunk: int = QUERY_CHUNK):
    """Score of each non-prefix token: CLS-row attention (mean over heads) when there is a prefix,
    else the mean attention it receives from all queries, `query_chunk` query rows at a time.
    q, k: [B, H, N, d]. Returns [B, N - p]."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if protected > 0:
        rows = [(0, 1)]
    else:
        n = q.shape[2]
        rows = [(start, min(start + query_chunk, n)) for start in range(0, n, query_chunk)]
    total = None
    for start, stop in rows:
        logits = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scale
        if attn_mask is not None:
            logits = logits + _mask_rows(attn_mask, start, stop, logits.dtype)
        part = logits.softmax(dim=-1).sum(dim=2)
        total = part if total is None else total + part
    scores = total.mean(dim=1) / (rows[-1][1] - rows[0][0])
    return scores[:, protected:]


def _mask_rows(attn_mask, start: int, stop: int, dtype) -> torch.Tensor:
    rows = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., start:stop, :]
    if rows.dtype == torch.bool:
        return torch.zeros(rows.shape, dtype=dtype, device=rows.device).masked_fill(~rows, -math.inf)
    return rows


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, protected: int, fuse: bool,
                 select=top_k_in_order):
    """Keep the prefix and the `keep` best-scored tokens in their original order; with fuse, append one
    token that is the sum of the dropped ones weighted by their scores (EViT). x: [B, N, C], scores: [B, N - p]. `select`:
    top_k_in_order, or a kernel with its signature."""
    rest = x[:, protected:]
    kept_idx = select(scores, keep)
    recorder.add("topk", protected, kept_idx, fuse)
    kept = rest.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return join_kept(x, rest, kept, kept_idx, scores, protected, fuse)


def join_kept(x, rest, kept, kept_idx, scores, protected: int, fuse: bool) -> torch.Tensor:
    """[prefix, kept tokens, (with fuse) EViT's fused token: the dropped tokens weighted by their scores as they
    are (the attention they received, summing to less than 1), not renormalised]."""
    parts = [x[:, :protected], kept]
    if fuse:
        dropped_weight = scores.scatter(1, kept_idx, 0.0)
        parts.append((dropped_weight.unsqueeze(-1).to(rest.dtype) * rest).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def topk_step(x, q, k, scale: float, keep: int, protected: int, fuse: bool, attn_mask=None,
              select=top_k_in_order):
    """One pruning step at a block: score tokens from the block's own q and k, then prune x."""
    scores = attention_received(q, k, scale, protected, attn_mask)
    return prune_tokens(x, scores, keep, protected, fuse, select)


def scores_from_probabilities(probs: torch.Tensor, protected: int) -> torch.Tensor:
    """The scores of attention_received, read from attention probabilities [B, H, N, N] that a graph
    already computes (ONNX exports materialise them): CLS row with a prefix, else the column mean."""
    rows = probs[:, :, :1] if protected > 0 else probs
    scores = rows.sum(dim=2).mean(dim=1) / rows.shape[2]
    return scores[:, protected:]


@torch.library.custom_op("tokensparse::topk_prune", mutates_args=())
def topk_prune_op(x: Tensor, q: Tensor, k: Tensor, scale: float, keep: int, protected: int, fuse: bool,
                  attn_mask: Optional[Tensor] = None) -> Tensor:
    """Attention-rank step: keep the prefix and the `keep` most-attended tokens of x (+ a fused one)."""
    return topk_step(x, q, k, scale, keep, protected, fuse, attn_mask)


@topk_prune_op.register_fake
def _topk_prune_fake(x, q, k, scale, keep, protected, fuse, attn_mask=None):
    batch, _, channels = x.shape
    return x.new_empty(batch, token_count(protected + keep + int(fuse)), channels)


@flop_counter.register_flop_formula(torch.ops.tokensparse.topk_prune)
def _topk_prune_flops(x_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, tokens, dim = q_shape
    return 2 * batch * heads * tokens * tokens * dim if args[2] == 0 else 2 * batch * heads * tokens * dim


TOPK_PRUNE = torch.ops.tokensparse.topk_prune.default
