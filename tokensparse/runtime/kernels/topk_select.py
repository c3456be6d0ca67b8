"""Top-k token selection with gather, for any k (TensorRT's TopK stops at K=3840; video and
high-resolution inputs hold more tokens): per row, one sort of (score, index) keys in Triton, the first k
indices sorted back into token order, then a row gather. Ties go to the lower index, as in ONNX TopK."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokensparse.runtime.kernels.launch import launch as _launch


def topk_gather_reference(x, scores, k: int):
    """kept [B, k] (ascending token order) and x gathered at them [B, k, C]."""
    kept = scores.topk(k, dim=-1, sorted=True).indices.sort(dim=-1).values
    return kept, x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@triton.jit
def _select_rows(scores_ptr, kept_ptr, tokens, k, BLOCK_N: tl.constexpr):
    """kept[b, :k] = indices of the k largest scores of row b, in ascending index order."""
    b = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_N)
    valid = offsets < tokens
    score = tl.load(scores_ptr + b * tokens + offsets, mask=valid, other=0.0).to(tl.float32) + 0.0  # -0 -> +0
    bits = score.to(tl.int32, bitcast=True)
    # Order-preserving map of float bits onto unsigned 32-bit order, then key = (ordered << 31) | (2^31 - 1
    # - index), a non-negative int64: a descending sort puts larger scores first and, among equal ones,
    # the lower index first.
    ordered = tl.where(bits < 0, ~bits, bits | (-2147483648)).to(tl.uint32).to(tl.int64)
    ordered = tl.where(valid, ordered, 0)
    key = (ordered << 31) | (2147483647 - offsets).to(tl.int64)
    key = tl.sort(key, 0, descending=True)
    index = 2147483647 - (key & 2147483647).to(tl.int32)
    chosen = tl.where(offsets < k, index, 2147483647)
    chosen = tl.sort(chosen, 0)
    tl.store(kept_ptr + b * k + offsets, chosen.to(tl.int64), mask=offsets < k)


@triton.jit
def _gather_rows(x_ptr, kept_ptr, out_ptr, tokens, k, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, j] = x[b, kept[b, j]] for a tile of BLOCK_R rows."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = j < k
    row = tl.load(kept_ptr + b * k + j, mask=valid, other=0)
    for start in range(0, channels, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        keep = valid[:, None] & (c < channels)[None, :]
        value = tl.load(x_ptr + (b * tokens + row)[:, None] * channels + c[None, :], mask=keep)
        tl.store(out_ptr + (b * k + j)[:, None] * channels + c[None, :], value, mask=keep)


def topk_gather(x, scores, k: int, block_r: int = 32, block_c: int = 64, launch=None):
    """Same result as topk_gather_reference, for any k <= tokens."""
    batch, tokens, channels = x.shape
    if not 1 <= k <= tokens:
        raise ValueError(f"k={k} is out of range: it must be in 1..{tokens}")
    x, scores = x.contiguous(), scores.contiguous()
    kept = torch.empty(batch, k, dtype=torch.int64, device=x.device)
    _launch(launch, _select_rows)[(batch,)](scores, kept, tokens, k, BLOCK_N=triton.next_power_of_2(tokens))
    out = torch.empty(batch, k, channels, dtype=x.dtype, device=x.device)
    _launch(launch, _gather_rows)[(batch, triton.cdiv(k, block_r))](
        x, kept, out, tokens, k, channels, BLOCK_R=block_r, BLOCK_C=min(block_c, triton.next_power_of_2(channels))
    )
    return kept, out
