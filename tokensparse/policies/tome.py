"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

Plain PyTorch. These functions are the policy's eager reference and also what the merge pass splices
into a compiled graph, so there is one source of truth for the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils import flop_counter

from tokensparse.policies.base import Policy, check_int_at_least, recorder
from tokensparse.policies.op_shapes import token_count
from tokensparse.policies.selection import rank_order
from tokensparse.policies.tower_step import KEYS, SIZE, X, TowerStep

SCHEDULES = ("constant", "decreasing")


@dataclass(frozen=True)
class ToMe(Policy):
    """ToMe (Bolya et al., ICLR 2023): merge r tokens per block between attention and MLP."""

    r: Union[int, Sequence[int]] = 13
    schedule: str = "constant"
    proportional_attention: bool = True
    prefix_tokens: Optional[int] = None

    name = "tome"

    def __post_init__(self):
        if isinstance(self.r, (list, tuple)):
            object.__setattr__(self, "r", tuple(self.r))
            for value in self.r:
                check_int_at_least("r", value, 0)
        else:
            check_int_at_least("r", self.r, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if isinstance(self.r, tuple) and self.schedule != "constant":
            raise ValueError("schedule must be 'constant' when r is given per block as a list")
        if self.prefix_tokens is not None:
            check_int_at_least("prefix_tokens", self.prefix_tokens, 0)

    def r_per_block(self, depth: int) -> list[int]:
        """Requested merges for each of `depth` blocks (before capping at half the tokens)."""
        if isinstance(self.r, tuple):
            if len(self.r) != depth:
                raise ValueError(f"r has {len(self.r)} entries but the model has {depth} blocks")
            return list(self.r)
        if self.schedule == "constant" or depth == 1:
            return [self.r] * depth
        # Decreasing: linear from 2r in the first block to 0 in the last, the same total as constant r.
        return [int(2 * self.r - 2 * self.r * i / (depth - 1)) for i in range(depth)]

    def is_identity(self, depth: int) -> bool:
        return all(r == 0 for r in self.r_per_block(depth))

    @property
    def sizes_bias_attention(self) -> bool:
        return self.proportional_attention

    def tower_step(self, index: int, depth: int, tokens: int, prefix: int) -> Optional[TowerStep]:
        r = capped_r(self.r_per_block(depth)[index], tokens, prefix)
        if r == 0:
            return None
        return TowerStep("merge_tokens", TOME_MERGE, tome_step, (X, SIZE, KEYS, r, prefix), tokens - r, sized=True,
                         note=f"merge {r} of {tokens} tokens")


def capped_r(r: int, tokens: int, protected: int) -> int:
    """ToMe removes at most half of the mergeable tokens in one block, and always leaves two tokens."""
    return max(0, min(r, (tokens - protected) // 2, tokens - 2))


def tome_partition(protected: int) -> tuple[int, int]:
    """(tokens left out of the matching, leading A tokens that never merge) for `protected` prefix tokens.
    ToMe's own partition alternates over all tokens: a single CLS is A[0] and never merges (-inf similarity),
    so the patches after it start with a B token. With CLS and a distillation token (A[0] and B[0], both
    -inf) that partition equals leaving the two out. ToMe defines none for other prefixes (registers): they
    are left out, and the patches after them start with an A token."""
    return (0, 1) if protected == 1 else (protected, 0)


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int, split=None, excluded: int = 0):
    """Match alternate tokens A=even, B=odd (after the `protected` prefix) and pick the r best edges.

    metric: [B, N, c] (keys averaged over heads). Returns (src_idx, dst_idx, unm_idx), each [B, *, 1]:
    src_idx indexes A tokens that merge, dst_idx the B token each merges into, unm_idx the A tokens
    that stay, in their original order. The first `excluded` A tokens never merge (ToMe's -inf for a CLS
    token inside the partition: tome_partition). `split`, given, picks the r best edges instead of a sort:
    (node_max, r) -> (the r best A tokens, the others), each in token order (ties to the lower index,
    as the stable sort) — the same matches, with src_idx in token order.
    """
    m = metric[:, protected:]
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2].contiguous(), m[:, 1::2].contiguous()
    scores = a @ b.transpose(-1, -2)
    if excluded:
        rows = torch.arange(scores.shape[1], device=scores.device)[None, :, None]
        scores = scores.masked_fill(rows < excluded, -math.inf)
    node_max, node_idx = scores.max(dim=-1)
    if split is None:
        order = rank_order(node_max)
        src_idx = order[:, :r].unsqueeze(-1)
        unm_idx = _unranked_in_order(order, r).unsqueeze(-1)
    else:
        src_idx, unm_idx = (index.unsqueeze(-1) for index in split(node_max, r))
    dst_idx = node_idx.unsqueeze(-1).gather(1, src_idx)
    return src_idx, dst_idx, unm_idx


def _unranked_in_order(order: torch.Tensor, r: int) -> torch.Tensor:
    """[B, M - r]: the indices that a ranking order [B, M] places after its first r, ascending, without a sort: a
    token's rank is where the order holds it; those ranked r and later are compacted in token order by a
    running count (one scatter, whose surplus writes go to a slot cut off)."""
    batch, tokens = order.shape
    positions = torch.arange(tokens, device=order.device).expand(batch, tokens)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    kept = rank >= r
    # kept tokens up to each one: a masked sum over the positions before it (a reduction every compiler fuses,
    # where a cumsum is a scan that Inductor's CPU backend leaves to an eager call), M^2 per sample for M ~ N/2
    before = positions[0, None, :] <= positions[0, :, None]
    slot = torch.where(kept, (kept[:, None, :] & before).sum(dim=-1) - 1, tokens - r)
    return order.new_zeros(batch, tokens - r + 1).scatter_(1, slot, positions)[:, : tokens - r]


def merge_tokens(x: torch.Tensor, size: torch.Tensor, src_idx, dst_idx, unm_idx, protected: int,
                 accumulate: bool = False):
    """Size-weighted merge: x_b <- (s_a x_a + s_b x_b) / (s_a + s_b), s_b <- s_a + s_b.

    x: [B, N, C], size: [B, N, 1]. Output tokens: the protected prefix, the unmerged A tokens in their
    original order, then every B token. The sums go into B by scatter_reduce, or with `accumulate` by an
    accumulating index_put (the same sums, which Inductor compiles into its own kernel).
    """
    channels = x.shape[-1]
    weighted, sizes = x[:, protected:] * size[:, protected:], size[:, protected:]
    a, b = weighted[:, ::2], weighted[:, 1::2]
    a_size, b_size = sizes[:, ::2], sizes[:, 1::2]
    b = _sum_into(b, dst_idx, a.gather(1, src_idx.expand(-1, -1, channels)), accumulate)
    b_size = _sum_into(b_size, dst_idx, a_size.gather(1, src_idx), accumulate)
    merged_size = torch.cat([a_size.gather(1, unm_idx), b_size], dim=1)
    merged_x = torch.cat([a.gather(1, unm_idx.expand(-1, -1, channels)), b], dim=1) / merged_size
    return torch.cat([x[:, :protected], merged_x], dim=1), torch.cat([size[:, :protected], merged_size], dim=1)


def _sum_into(rows: torch.Tensor, index: torch.Tensor, values: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """rows [B, M, W] plus each values[:, i] added at row index[:, i, 0]."""
    if accumulate:
        batch = torch.arange(rows.shape[0], device=rows.device)[:, None]
        return rows.index_put((batch, index[..., 0]), values, accumulate=True)
    return rows.scatter_reduce(1, index.expand(-1, -1, rows.shape[-1]), values, reduce="sum")


def accumulating_merge(x, size, src_idx, dst_idx, unm_idx, protected: int):
    """merge_tokens with accumulate=True (the form compiled by Inductor)."""
    return merge_tokens(x, size, src_idx, dst_idx, unm_idx, protected, accumulate=True)


def tome_step(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, protected: int,
              merge=merge_tokens, split=None):
    """One ToMe block step: metric from the block's keys [B, H, N, d], then merge r tokens with `merge`
    (merge_tokens, or a kernel with its signature; `split` as in bipartite_soft_matching). r = 0 changes
    nothing (tokens keep their order)."""
    if r == 0:
        return x, size
    metric = keys.mean(dim=1)
    protected, excluded = tome_partition(protected)
    src_idx, dst_idx, unm_idx = bipartite_soft_matching(metric, r, protected, split, excluded)
    recorder.add("tome", protected, src_idx, dst_idx, unm_idx)
    return merge(x, size, src_idx, dst_idx, unm_idx, protected)


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention: + log(s_j) on the logits of key j, as an additive [B, 1, 1, N] mask."""
    return size.log().transpose(1, 2).unsqueeze(1)


@torch.library.custom_op("tokensparse::tome_merge", mutates_args=())
def tome_merge_op(x: Tensor, size: Tensor, keys: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """ToMe step: merge r tokens of x [B, N, C] (sizes [B, N, 1]) by the block's keys [B, H, N, d]."""
    if r == 0:
        return x.clone(), size.clone()
    return tome_step(x, size, keys, r, protected)


@tome_merge_op.register_fake
def _tome_merge_fake(x, size, keys, r, protected):
    batch, tokens, channels = x.shape
    out = token_count(tokens - r)
    return x.new_empty(batch, out, channels), size.new_empty(batch, out, 1)


@flop_counter.register_flop_formula(torch.ops.tokensparse.tome_merge)
def _tome_merge_flops(x_shape, size_shape, keys_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, tokens, dim = keys_shape
    half = (tokens + 1) // 2
    return batch * heads * tokens * dim + 2 * batch * half * (tokens // 2) * dim


@torch.library.custom_op("tokensparse::merge_matches", mutates_args=())
def merge_matches_op(x: Tensor, size: Tensor, src_idx: Tensor, dst_idx: Tensor, unm_idx: Tensor,
                     protected: int) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted merge for matches already made (indices [B, *, 1]): the TomeMergeRows plugin."""
    return merge_tokens(x, size, src_idx, dst_idx, unm_idx, protected)


@merge_matches_op.register_fake
def _merge_matches_fake(x, size, src_idx, dst_idx, unm_idx, protected):
    batch, tokens, channels = x.shape
    out = protected + unm_idx.shape[1] + (tokens - protected) // 2
    return x.new_empty(batch, out, channels), size.new_empty(batch, out, 1)


def tome_merge_step(x, size, keys, r: int, protected: int):
    """tokensparse::tome_merge as the function Inductor compiles with the model (r = 0 changes nothing), its sums
    into B tokens by an accumulating index_put (Inductor leaves scatter_reduce to an eager call)."""
    return tome_step(x, size, keys, r, protected, merge=accumulating_merge)


TOME_MERGE = torch.ops.tokensparse.tome_merge.default
MERGE_MATCHES = torch.ops.tokensparse.merge_matches.default
