"""What the KV-cache policies share: they choose, per decoder layer and KV head, which cached positions
stay for the next decode steps (stage "kv"). Positions keep their original RoPE rotation."""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

from tokensparse.policies.base import Policy, check_int_at_least
from tokensparse.policies.selection import rank_order, top_k_in_order

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
             scores: torch.Tensor | None = None, padding: torch.Tensor | None = None) -> torch.Tensor:
        """The plain-PyTorch selection: kept positions [B, H_kv, count], ascending, of keys [B, H_kv, L, d],
        from the forward's queries [B, H, S, d] (and, for a scored policy, the accumulated scores [B, H_kv, L]).
        `padding` [B, L] marks the positions of a padded batch's padding: they draw no attention, and are
        kept last, only where a sample has fewer real positions than the count."""
        raise NotImplementedError

    def is_identity(self, depth: int) -> bool:
        return False


class PrefillBudget(KVPolicy):
    """A policy that evicts once, in the prefill (the forward with more than one query), down to exactly
    `budget` positions per layer and KV head (a count, or a fraction of the prompt), the last `window` of them
    always kept. A count below the window is a ValueError (check_window_fits); a fraction that comes to fewer
    positions than the window keeps the last positions only. Subclasses are dataclasses with the fields
    `budget` (int or float) and `window` (int)."""

    def check_window_fits(self) -> None:
        """A budget given as a count must hold the window that is always kept."""
        if isinstance(self.budget, numbers.Integral) and self.budget < self.window:
            raise ValueError(f"budget={self.budget} is below window={self.window}: {self.name} always keeps its "
                             f"last {self.window} positions, so a budget of {self.budget} cannot hold; give "
                             f"budget >= {self.window} or a smaller window")

    def kept_count(self, cache_length: int) -> int:
        return budget_count(self.budget, cache_length)

    def evicts(self, query_length: int, cache_length: int) -> bool:
        return query_length > 1 and self.kept_count(cache_length) < cache_length

    def is_identity(self, depth: int) -> bool:
        return isinstance(self.budget, float) and self.budget == 1.0


def evict_positions(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache reduced to the kept positions kept [B, H_kv, K] (per layer and KV head): keys and values
    [B, H_kv, K, d]."""
    index = kept.unsqueeze(-1)
    return (keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1])),
            values.gather(2, index.expand(-1, -1, -1, values.shape[-1])))


def score_ranks(scores: torch.Tensor, kind: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H_kv, N]: each position's rank by descending score, ties to the lower position; with kind [B, N], its
    rank among the positions of its kind, the other positions ranked after them."""
    if kind is not None:
        scores = scores.masked_fill(~kind[:, None, :], -math.inf)
    order = rank_order(scores)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def kept_positions(kept: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, K] ascending: the True positions of kept [B, H_kv, L], the same count in every row. Data-dependent
    only through nonzero, so that torch.export and ONNX trace it."""
    return kept.nonzero()[:, 2].reshape(kept.shape[0], kept.shape[1], -1).clone(memory_format=torch.contiguous_format)


def check_budget(option: str, value, low: int) -> None:
    """A budget is a count of positions (an int >= low) or a fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{option}={value!r} must be a count of positions (int >= {low}) or a fraction in (0, 1]")
    if isinstance(value, numbers.Integral):
        check_int_at_least(option, value, low)
    elif not 0 < value <= 1:
        raise ValueError(f"{option}={value!r} is out of range: a fraction must be in (0, 1] (or give a count)")


def budget_count(budget: Union[int, float], available: int) -> int:
    """Positions kept out of `available`: a count (at most all), or round(fraction * available)."""
    wanted = budget if isinstance(budget, numbers.Integral) else round(budget * available)
    return min(available, wanted)


def padded_positions(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length] bool: the cached positions that an attention's last query may not see, from its mask
    [B, 1 or H, Q, >= length] (bool, True where allowed, or additive float): a padded batch's padding."""
    last = attention_mask[:, 0, -1, -length:]
    allowed = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return ~allowed


def all_but_one(count, length, dropped: torch.Tensor) -> torch.Tensor:
    """Kept positions [..., count], ascending, of a cache of `length` at most one position over `count`: every
    position but dropped [...] when it is one over, every position otherwise; no branch on `length` (a symbol in
    an exported decode graph)."""
    dropped = dropped + (count + 1 - length) * (length + 1)          # nothing over count: past every position
    index = torch.arange(count, device=dropped.device)
    return index + (index >= dropped[..., None]).long()


def best_and_recent(scores_before: torch.Tensor, length: int, count: int, recent: int,
                    padding: torch.Tensor | None = None) -> torch.Tensor:
    """Kept positions [B, H_kv, count], ascending, out of `length`: the last min(recent, count) positions and
    the best-scored of the positions before them, by scores_before [B, H_kv, >= length - recent] (ties to
    the lower position). Padding positions (padding [B, length]) rank below every other position."""
    batch, kv_heads = scores_before.shape[:2]
    recent = torch.sym_min(torch.sym_min(recent, count), length)   # data-dependent after FastV: no guard
    tail = torch.arange(length - recent, length, device=scores_before.device).expand(batch, kv_heads, recent)
    scores_before = scores_before[..., : length - recent]
    if padding is not None:
        scores_before = scores_before.masked_fill(padding[:, None, : length - recent], -math.inf)
    return torch.cat([top_k_in_order(scores_before, count - recent), tail], dim=-1)


def attention_column_sums(q: torch.Tensor, keys: torch.Tensor, scale: float, padding: torch.Tensor | None = None,
                          positions: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """[B, H_kv, L] float32: the attention probabilities that the forward's queries q [B, H, S, d] (causal,
    at positions L-S..L-1) give keys [B, H_kv, L, d], summed over the queries and averaged over each KV
    group's query heads. A decode step (S = 1) costs one q K^T row. Padding positions (padding [B, L]) are
    neither attended to nor counted as queries. With the keys' positions [B, H_kv, L] (int64; the last S the
    queries') and a sliding window, a query at position p sees only the keys at positions > p - window."""
    batch, heads, queries, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    grouped_keys = keys.float().unsqueeze(2).transpose(-1, -2)                          # [B, H_kv, 1, d, L]
    columns = torch.arange(length, device=keys.device)
    sums = keys.new_zeros(batch, kv_heads, heads // kv_heads, length, dtype=torch.float32)
    # A symbolic query count (an export for any prompt length) is one block: chunking would fix the length.
    starts, chunk = (range(0, queries, QUERY_CHUNK), QUERY_CHUNK) if isinstance(queries, int) else ((0,), queries)
    for start in starts:
        block = q[:, :, start:start + chunk].float()
        rows = block.shape[2]
        logits = block.reshape(batch, kv_heads, heads // kv_heads, rows, dim) @ grouped_keys * scale
        rows_at = torch.arange(length - queries + start, length - queries + start + rows, device=keys.device)
        logits = logits.masked_fill(columns > rows_at[:, None], -math.inf)
        if positions is not None and window:
            query_positions = positions[..., length - queries + start:length - queries + start + rows]
            outside = positions[..., None, :] <= query_positions[..., :, None] - window   # [B, H_kv, rows, L]
            logits = logits.masked_fill(outside[:, :, None], -math.inf)
        if padding is None:
            sums += logits.softmax(dim=-1).sum(dim=-2)
            continue
        probabilities = logits.masked_fill(padding[:, None, None, None, :], -math.inf).softmax(dim=-1)
        real_queries = ~padding[:, rows_at]                                              # [B, rows]
        sums += probabilities.nan_to_num(0.0).mul(real_queries[:, None, None, :, None]).sum(dim=-2)
    return sums.mean(dim=2)
