"""What the KV-cache policies share: they choose, per decoder layer and KV head, which cached positions
stay for the next decode steps (stage "kv"). Positions keep their original RoPE rotation."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

from tokensparse.policies.base import Policy, check_int_at_least
from tokensparse.policies.selection import rank_order, top_k_in_order

QUERY_CHUNK = 256       # queries per q K^T block in the column sums: bounds memory to [B, H, 256, L]
DATA_DEPENDENT = "a data-dependent number"     # a kept count that the selection itself decides


class NotApplicable(Exception):
    """The policy's graph step cannot act on this graph; the message says why (the compiler names the site)."""


def is_prefill(queries) -> bool:
    """More than one new token; a data-dependent count is a prefill whose tokens a policy pruned (a vision-encoder
    policy's cut before layer 0), never a decode step."""
    return guard_or_true(queries > 1)


@dataclass
class SiteInputs:
    """What a KV policy's graph step reads at one layer's cache: graph values (fx nodes) or constants. The
    lazy ones are functions, called only by a policy that reads them."""

    query: Any                                   # the forward's queries [B, H, S, d]
    keys: Any                                    # the grown cache's keys [B, H_kv, L, d]
    scale: Callable[[], float]                   # the attention's scale (fails where it is not a constant)
    count: Any = None                            # the kept count from graph_count
    scores: Any = None                           # a scored policy's accumulated scores [B, H_kv, L]
    padding: Any = None                          # [B, L] bool: a padded batch's padding, or None
    prefill: bool = True
    image_mask: Callable[[], Any] = lambda: None  # [B, L] bool: which cached positions are image tokens
    hidden: Callable[[], Any] = lambda: None      # the hidden states [B, L, D] the attention reads


class KVPolicy(Policy):
    """A policy that shrinks a decoder's KV cache (Config(kv=...)). Besides its plain-PyTorch selection
    (keep), it declares the steps the compiler inserts: graph_count and graph_selection for every cache, and
    for a StaticCache static_decode_step."""

    stage = "kv"
    scored = False          # whether it accumulates a score per cached position (needs a ScoredCache)
    count_from_selection = False    # whether the kept count depends on the data (the selection decides it)
    evicts_each_step = False        # whether it evicts at decode steps too, not only after the prefill
    static_cache_form = True        # whether it evicts from a StaticCache's buffers
    at_cache_positions = False      # whether the cache holds keys before RoPE, read at their cache slots
    context_inputs: tuple = ()      # keep()'s extra keyword inputs, of SiteInputs' lazy ones

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

    def keeps_all_up_to(self) -> Optional[int]:
        """The longest cache this policy never evicts from (what a prefill graph branches on), or None where it may
        evict from any length (a budget given as a fraction)."""
        return None

    def graph_count(self, queries, length, at_most: Callable[[int], Any]):
        """How many positions a forward with `queries` new tokens keeps of a cache of `length` (ints, or sizes
        symbolic in the graph): an int; at_most(n), min(cache length, n) as a graph value; DATA_DEPENDENT where the
        selection decides; None where it keeps every position. NotApplicable where it cannot say."""
        if self.count_from_selection:
            evicts = self.evicts(queries, length) if isinstance(length, int) else \
                is_prefill(queries) and not self.is_identity(0)
            return DATA_DEPENDENT if evicts else None
        if isinstance(length, int):
            return self.kept_count(length) if self.evicts(queries, length) else None
        return None

    def graph_selection(self, site: SiteInputs) -> tuple[Callable, tuple]:
        """The op (or traceable function) the compiler inserts for the kept positions [B, H_kv, count] at a
        cache site, and its arguments."""
        raise NotApplicable(f"policy {self.name!r} has no cache selection")

    def static_decode_step(self, buffers, site: SiteInputs) -> Optional[tuple[Callable, tuple, str]]:
        """For a StaticCache layer (buffers: its keys, values, scores and length), the in-place op that evicts after
        each decode step's attention, its arguments and what it does in words; None where the policy evicts only
        after the prefill."""
        return None


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

    def keeps_all_up_to(self) -> Optional[int]:
        return self.budget if isinstance(self.budget, numbers.Integral) else None

    def graph_count(self, queries, length, at_most):
        if isinstance(length, int):
            return super().graph_count(queries, length, at_most)
        if not is_prefill(queries) or self.is_identity(0):
            return None
        if not isinstance(self.budget, int):
            raise NotApplicable(f"its cache length {length} is data-dependent, so {self.name} needs a budget given "
                                f"as a count, not the fraction {self.budget}")
        return at_most(self.budget)


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


@torch.library.custom_op("tokensparse::attention_column_sums", mutates_args=())
def attention_column_sums_op(q: Tensor, keys: Tensor, scale: float, padding: Optional[Tensor] = None,
                             positions: Optional[Tensor] = None, window: int = 0) -> Tensor:
    """[B, H_kv, L] float32: the attention the forward's queries q [B, H, S, d] (causal, the last S positions)
    give each cached key [B, H_kv, L, d], summed over the queries and averaged over each KV group (padding
    [B, L]: positions that neither draw nor ask attention; positions [B, H_kv, L] with a sliding window: each
    query sees the keys within the window of its position)."""
    return attention_column_sums(q, keys, scale, padding, positions, window)


@attention_column_sums_op.register_fake
def _attention_column_sums_fake(q, keys, scale, padding=None, positions=None, window=0):
    return keys.new_empty(keys.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tokensparse::kv_evict", mutates_args=())
def kv_evict_op(keys: Tensor, values: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """The cache reduced to the kept positions kept [B, H_kv, K] (per layer and KV head): new keys and
    values [B, H_kv, K, d]. DynamicCache stores these in place of the grown cache."""
    return evict_positions(keys, values, kept)


@kv_evict_op.register_fake
def _kv_evict_fake(keys, values, kept):
    batch, heads, count = kept.shape
    return keys.new_empty(batch, heads, count, keys.shape[-1]), values.new_empty(batch, heads, count, values.shape[-1])


ATTENTION_COLUMN_SUMS = torch.ops.tokensparse.attention_column_sums.default
KV_EVICT = torch.ops.tokensparse.kv_evict.default
