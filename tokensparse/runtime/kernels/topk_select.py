"""Top-k token selection with gather, for any k (TensorRT's TopK stops at K=3840; video and
high-resolution inputs hold more tokens). Per row, a radix select finds the k-th largest score (32 counting
passes over the row, one bit of the threshold each), then one pass in token order writes the indices above
it and the first ties at it, so the kept indices come out in token order with no sort. Ties go to the lower
index, as in ONNX TopK and tokensparse.policies.selection.top_k_in_order (the reference: the same indices for
every input, -0 == +0 and NaN above +inf included; half and bfloat16 scores compare exactly as float32).
Every pass walks the row in tiles, so any token count compiles to one small kernel.
The selection is one launch in TensorRT's plugin calling convention (inputs, then the sizes as int32
scalars, then outputs: tokensparse/deploy/trt_aot.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokensparse.policies.selection import top_k_in_order
from tokensparse.runtime.kernels.launch import launch as _launch


def topk_gather_reference(x, scores, k: int):
    """kept [B, k] (ascending token order, ties to the lower index: top_k_in_order) and x gathered at them
    [B, k, C]."""
    kept = top_k_in_order(scores, k)
    return kept, x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@triton.jit
def _ordered_keys(scores_ptr, row, tokens, offsets):
    """Scores as int64 keys in [0, 2^32) with torch.sort's order: -0 == +0, every NaN equal and above +inf;
    -1 past the row's end."""
    valid = offsets < tokens
    score = tl.load(scores_ptr + row * tokens + offsets, mask=valid, other=0.0).to(tl.float32) + 0.0
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)      # NaN: one positive quiet NaN
    ordered = tl.where(bits < 0, ~bits, bits | (-2147483648)).to(tl.uint32).to(tl.int64)
    return tl.where(valid, ordered, -1)


@triton.jit
def _kth_largest(scores_ptr, b, tokens, k, BLOCK_N: tl.constexpr):
    """Row b's k-th largest key, and how many keys equal to it are among the k largest."""
    lanes = tl.arange(0, BLOCK_N)
    # The k-th largest key: the largest t with at least k keys >= t, built from the top bit down.
    threshold = tl.full([], 0, tl.int64)
    for step in range(32):
        candidate = threshold | (tl.full([], 1, tl.int64) << (31 - step))
        count = tl.full([], 0, tl.int32)
        for start in range(0, tokens, BLOCK_N):
            key = _ordered_keys(scores_ptr, b, tokens, start + lanes)
            count += tl.sum((key >= candidate).to(tl.int32), 0)
        threshold = tl.where(count >= k, candidate, threshold)
    above = tl.full([], 0, tl.int32)
    for start in range(0, tokens, BLOCK_N):
        above += tl.sum((_ordered_keys(scores_ptr, b, tokens, start + lanes) > threshold).to(tl.int32), 0)
    return threshold, k - above


@triton.jit
def _write_in_order(scores_ptr, b, tokens, k, kept_ptr, rest_ptr, WRITE_REST: tl.constexpr, BLOCK_N: tl.constexpr):
    """One pass in token order: the k largest (ties: the first ones) to kept[b], the others to rest[b]."""
    threshold, ties_wanted = _kth_largest(scores_ptr, b, tokens, k, BLOCK_N)
    lanes = tl.arange(0, BLOCK_N)
    written = tl.full([], 0, tl.int32)
    ties_seen = tl.full([], 0, tl.int32)
    for start in range(0, tokens, BLOCK_N):
        offsets = start + lanes
        key = _ordered_keys(scores_ptr, b, tokens, offsets)
        tie = (key == threshold).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, 0) - tie
        chosen = ((key > threshold) | ((tie == 1) & (tie_rank < ties_wanted))).to(tl.int32)
        slot = written + tl.cumsum(chosen, 0) - chosen
        tl.store(kept_ptr + b * k + slot, offsets.to(tl.int64), mask=chosen == 1)
        if WRITE_REST:
            other = (1 - chosen) * (offsets < tokens).to(tl.int32)
            rest_slot = start - written + tl.cumsum(other, 0) - other
            tl.store(rest_ptr + b * (tokens - k) + rest_slot, offsets.to(tl.int64), mask=other == 1)
        written += tl.sum(chosen, 0)
        ties_seen += tl.sum(tie, 0)


@triton.jit
def select_rows(scores_ptr, tokens, k, kept_ptr, BLOCK_N: tl.constexpr):
    """kept[b, :k] = indices of the k largest scores of row b, in ascending index order."""
    _write_in_order(scores_ptr, tl.program_id(0).to(tl.int64), tokens, k, kept_ptr, kept_ptr, False, BLOCK_N)


@triton.jit
def split_rows(scores_ptr, tokens, k, kept_ptr, rest_ptr, BLOCK_N: tl.constexpr):
    """select_rows, and rest[b, :tokens - k] = the other indices, in ascending index order."""
    _write_in_order(scores_ptr, tl.program_id(0).to(tl.int64), tokens, k, kept_ptr, rest_ptr, True, BLOCK_N)


@triton.jit
def _gather_rows(x_ptr, kept_ptr, out_ptr, tokens, k, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, j] = x[b, kept[b, j]] for a tile of BLOCK_R rows."""
    b = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = j < k
    row = tl.load(kept_ptr + b * k + j, mask=valid, other=0)
    for start in range(0, channels, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        keep = valid[:, None] & (c < channels)[None, :]
        value = tl.load(x_ptr + (b * tokens + row)[:, None] * channels + c[None, :], mask=keep)
        tl.store(out_ptr + (b * k + j)[:, None] * channels + c[None, :], value, mask=keep)


def select_launch(scores_shape, k):
    """select_rows' grid (one program per row) and the int32 scalars after its input. Sizes are ints or
    TensorRT shape expressions."""
    return (scores_shape[0],), (scores_shape[1], k)


def select_constants(block_n: int = 1024) -> dict:
    """select_rows' compile-time parameters: BLOCK_N is the tile its passes walk a row in."""
    return {"BLOCK_N": block_n}


def topk_select(scores, k: int, block_n: int = 1024, launch=None):
    """kept [B, k] int64: the indices of each row's k largest scores, in token order (ties: lower index)."""
    return _in_token_order(scores, k, False, block_n, launch)[0]


def topk_split(scores, k: int, block_n: int = 1024, launch=None):
    """(kept [B, k], rest [B, N - k]), both int64 in token order: the k largest scores' indices (ties: lower
    index) and the others. 1 <= k <= N."""
    kept, rest = _in_token_order(scores, k, True, block_n, launch)
    return kept, rest


def _in_token_order(scores, k: int, with_rest: bool, block_n: int, launch) -> list:
    """One launch of select_rows (kept) or split_rows (kept and rest)."""
    batch, tokens = scores.shape
    if not 1 <= k <= tokens:
        raise ValueError(f"k={k} is out of range: it must be in 1..{tokens}")
    outputs = [torch.empty(batch, count, dtype=torch.int64, device=scores.device)
               for count in ((k, tokens - k) if with_rest else (k,))]
    grid, scalars = select_launch(scores.shape, k)
    _launch(launch, split_rows if with_rest else select_rows)[grid](
        scores.contiguous(), *scalars, *outputs, **select_constants(min(block_n, triton.next_power_of_2(tokens))))
    return outputs


def topk_gather(x, scores, k: int, block_r: int = 32, block_c: int = 64, block_n: int = 1024, launch=None):
    """Same result as topk_gather_reference, for any k <= tokens."""
    batch, tokens, channels = x.shape
    x = x.contiguous()
    kept = topk_select(scores, k, block_n, launch)
    out = torch.empty(batch, k, channels, dtype=x.dtype, device=x.device)
    _launch(launch, _gather_rows)[(batch, triton.cdiv(k, block_r))](
        x, kept, out, tokens, k, channels, BLOCK_R=block_r, BLOCK_C=min(block_c, triton.next_power_of_2(channels))
    )
    return kept, out
