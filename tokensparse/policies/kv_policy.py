"""What the KV-cache policies share: they choose, per decoder layer and KV head, which cached positions
stay for the next decode steps (stage "kv"). Positions keep their original RoPE rotation."""

from __future__ import annotations

import math

import torch

from tokensparse.policies.base import Policy

QUERY_CHUNK = 256       # queries per q K^T block in the column sums: bounds memory to [B, H, 256, L]


class KVPolicy(Policy):
    """A policy that shrinks a decoder's KV cache (Config(kv=...))."""

    stage = "kv"
    scored = False      # whether it accumulates a score per cached position (needs a ScoredCache)

    def evicts(self, query_length: int, cache_length: int) -> bool:
        """Whether a forward with this many new queries, whose cache then holds `cache_length` positions,
        evicts (static sizes; a symbolic size is compared once and guarded)."""
        raise NotImplementedError

    def kept_count(self, cache_length: int) -> int:
        """Positions kept per layer and KV head out of `cache_length`."""
        raise NotImplementedError

    def keep(self, query: torch.Tensor, keys: torch.Tensor, scale: float, count: int,
             scores: torch.Tensor | None = None) -> torch.Tensor:
        """The plain-PyTorch selection: kept positions [B, H_kv, count], ascending, of keys [B, H_kv, L, d],
        from the forward's queries [B, H, S, d] (and, for a scored policy, the accumulated scores [B, H_kv, L])."""
        raise NotImplementedError

    def is_identity(self, depth: int) -> bool:
        return False


def best_and_recent(scores_before: torch.Tensor, length: int, count: int, recent: int) -> torch.Tensor:
    """Kept positions [B, H_kv, count], ascending, out of `length`: the last min(recent, count) positions and
    the best-scored of the positions before them, by scores_before [B, H_kv, >= length - recent] (ties to
    the lower position)."""
    batch, kv_heads = scores_before.shape[:2]
    recent = min(recent, count, length)
    tail = torch.arange(length - recent, length, device=scores_before.device).expand(batch, kv_heads, recent)
    best = scores_before[..., : length - recent].sort(dim=-1, descending=True, stable=True).indices
    return torch.cat([best[..., : count - recent].sort(dim=-1).values, tail], dim=-1)


def attention_column_sums(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H_kv, L] float32: the attention probabilities that the forward's queries q [B, H, S, d] (causal,
    at positions L-S..L-1) give keys [B, H_kv, L, d], summed over the queries and averaged over each KV
    group's query heads. A decode step (S = 1) costs one q K^T row."""
    batch, heads, queries, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    grouped_keys = keys.float().unsqueeze(2).transpose(-1, -2)                          # [B, H_kv, 1, d, L]
    columns = torch.arange(length, device=keys.device)
    sums = keys.new_zeros(batch, kv_heads, heads // kv_heads, length, dtype=torch.float32)
    for start in range(0, queries, QUERY_CHUNK):
        block = q[:, :, start:start + QUERY_CHUNK].float()
        rows = block.shape[2]
        logits = block.reshape(batch, kv_heads, heads // kv_heads, rows, dim) @ grouped_keys * scale
        positions = torch.arange(length - queries + start, length - queries + start + rows, device=keys.device)
        logits = logits.masked_fill(columns > positions[:, None], -math.inf)
        sums += logits.softmax(dim=-1).sum(dim=-2)
    return sums.mean(dim=2)
