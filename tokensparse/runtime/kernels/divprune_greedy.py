"""DivPrune's greedy max-min selection (Alvar et al., CVPR 2025) as one Triton launch after the distance
matrix: one program per sample holds the running minimum distance to the chosen set and the chosen mask in
one block of next_power_of_2(N) lanes; each of the k steps is a masked argmax (ties and NaN as torch.argmax:
the first maximum, a NaN above everything) and a load of the pick's distance row. The eager loop launches ~5
ops a step. The reference, and the source of truth, is tokensparse.policies.divprune.divprune_select."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokensparse.policies.divprune import greedy_inputs
from tokensparse.runtime.kernels.launch import launch as _launch


@triton.jit
def _argmax(values, valid, lanes, BLOCK: tl.constexpr):
    """torch.argmax over the valid lanes: the first NaN if there is one, else the first maximum."""
    nan = valid & (values != values)
    finite = tl.where(valid & ~nan, values, -float("inf"))
    best = tl.max(finite, 0)
    hit = tl.where(tl.max(nan.to(tl.int32), 0) > 0, nan, valid & (finite == best))
    return tl.min(tl.where(hit, lanes, BLOCK), 0)


@triton.jit
def _greedy_rows(distances_ptr, nearest_ptr, tokens, k, picks_ptr, BLOCK: tl.constexpr):
    """picks[b, :k] in pick order: first the argmax of nearest[b] (each token's distance to its nearest
    neighbour), then k - 1 times the unchosen token farthest from the chosen set."""
    b = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements
    lanes = tl.arange(0, BLOCK)
    valid = lanes < tokens
    rows = distances_ptr + b * tokens * tokens
    first = _argmax(tl.load(nearest_ptr + b * tokens + lanes, mask=valid, other=0.0), valid, lanes, BLOCK)
    tl.store(picks_ptr + b * k, first.to(tl.int64))
    chosen = lanes == first
    to_set = tl.load(rows + first.to(tl.int64) * tokens + lanes, mask=valid, other=0.0)
    for step in range(1, k):
        candidate = _argmax(tl.where(chosen, -float("inf"), to_set), valid, lanes, BLOCK)
        tl.store(picks_ptr + b * k + step, candidate.to(tl.int64))
        chosen = chosen | (lanes == candidate)
        row = tl.load(rows + candidate.to(tl.int64) * tokens + lanes, mask=valid, other=0.0)
        to_set = tl.minimum(to_set, row, propagate_nan=tl.PropagateNan.ALL)    # torch.minimum keeps NaN


def divprune_greedy(distances, nearest, k: int, launch=None):
    """Picks [B, k] int64 in pick order from distances [B, N, N] float32 and nearest [B, N] (each row's
    minimum off the diagonal), one program per sample."""
    batch, tokens = nearest.shape
    picks = torch.empty(batch, k, dtype=torch.int64, device=distances.device)
    block = triton.next_power_of_2(tokens)
    _launch(launch, _greedy_rows)[(batch,)](distances.contiguous(), nearest.contiguous(), tokens, k, picks,
                                            BLOCK=block, num_warps=min(16, max(4, block // 256)))
    return picks


def divprune_select_triton(features, k: int, launch=None):
    """Same result as divprune_select (indices [B, k] ascending): the distances and each token's nearest
    neighbour in PyTorch, the greedy loop in one launch."""
    distances, nearest = greedy_inputs(features, k)
    return divprune_greedy(distances, nearest, k, launch).sort(dim=1).values
