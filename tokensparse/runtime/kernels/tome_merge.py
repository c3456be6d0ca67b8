"""ToMe's size-weighted merge (Bolya et al., ICLR 2023) as one Triton kernel: each program writes a tile of
output rows. Prefix and unmerged A rows are copies; a B row is its own size-weighted row plus those of the A
rows matched to it, divided by the summed sizes. The merged A rows are found by comparing the tile's B rows
with every match's destination (a 0/1 [rows, matches] tile times the matches' weighted rows), so there are
no atomics and the sums are deterministic. One launch, in TensorRT's plugin calling convention (inputs, then
the sizes as int32 scalars, then outputs: tokensparse/deploy/trt_aot.py). The matching (a [N/2, N/2]
similarity and its max; the r best edges are topk_select.py's split) comes before it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokensparse.runtime.kernels.launch import launch as _launch
from tokensparse.policies.tome import merge_tokens

BLOCK_ROWS = 16
BLOCK_MATCHES = 16
BLOCK_CHANNELS = 64


def tome_merge_reference(x, size, src_idx, dst_idx, unm_idx, protected: int):
    """The policy's own PyTorch merge (indices [B, *, 1] as bipartite_soft_matching returns them)."""
    return merge_tokens(x, size, src_idx, dst_idx, unm_idx, protected)


@triton.jit
def merge_rows(x_ptr, size_ptr, src_ptr, dst_ptr, unm_ptr, tokens, channels, matches, kept_a,
               out_ptr, out_size_ptr, PROTECTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """out[b] = [x prefix, x at unmerged A, every B merged]; out_size alike. Indices are A/B slots, as
    bipartite_soft_matching returns them (A token i is row PROTECTED + 2i, B token j row PROTECTED + 2j + 1)."""
    b = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements (long videos, large batches)
    o = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    out_tokens = PROTECTED + kept_a + (tokens - PROTECTED) // 2
    valid = o < out_tokens
    is_a = (o >= PROTECTED) & (o < PROTECTED + kept_a) & valid
    is_b = (o >= PROTECTED + kept_a) & valid
    a_slot = tl.load(unm_ptr + b * kept_a + tl.where(is_a, o - PROTECTED, 0), mask=is_a, other=0)
    b_slot = tl.where(is_b, o - PROTECTED - kept_a, -1)
    row = tl.where(is_b, PROTECTED + 1 + 2 * b_slot, tl.where(is_a, PROTECTED + 2 * a_slot, o))
    own_size = tl.load(size_ptr + b * tokens + row, mask=valid, other=1.0).to(tl.float32)
    merged_size = own_size
    for start in range(0, matches, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        dst = tl.load(dst_ptr + b * matches + k, mask=k < matches, other=-2)
        src_row = PROTECTED + 2 * tl.load(src_ptr + b * matches + k, mask=k < matches, other=0)
        src_size = tl.load(size_ptr + b * tokens + src_row, mask=k < matches, other=0.0).to(tl.float32)
        hit = (b_slot[:, None] == dst[None, :]) & is_b[:, None]
        merged_size += tl.sum(tl.where(hit, src_size[None, :], 0.0), 1)
    tl.store(out_size_ptr + b * out_tokens + o, merged_size.to(out_size_ptr.dtype.element_ty), mask=valid)
    weight = tl.where(is_b, own_size, 1.0)
    for c_start in range(0, channels, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        in_c = c < channels
        value = tl.load(x_ptr + (b * tokens + row)[:, None] * channels + c[None, :],
                        mask=valid[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        total = value * weight[:, None]
        for start in range(0, matches, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            dst = tl.load(dst_ptr + b * matches + k, mask=k < matches, other=-2)
            hit = (b_slot[:, None] == dst[None, :]) & is_b[:, None]
            if tl.sum(hit.to(tl.int32)) > 0:  # most tiles of matches reach none of this tile's rows
                src_row = PROTECTED + 2 * tl.load(src_ptr + b * matches + k, mask=k < matches, other=0)
                src_size = tl.load(size_ptr + b * tokens + src_row, mask=k < matches, other=0.0).to(tl.float32)
                src_value = tl.load(x_ptr + (b * tokens + src_row)[:, None] * channels + c[None, :],
                                    mask=(k < matches)[:, None] & in_c[None, :], other=0.0).to(tl.float32)
                total += tl.dot(hit.to(tl.float32), src_value * src_size[:, None], input_precision="ieee")
        result = tl.where(is_b[:, None], total / merged_size[:, None], total)
        tl.store(out_ptr + (b * out_tokens + o)[:, None] * channels + c[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=valid[:, None] & in_c[None, :])


def merge_launch(x_shape, src_shape, unm_shape, out_tokens, cdiv=triton.cdiv):
    """merge_rows' grid and the int32 scalars after its inputs. Sizes are ints or TensorRT shape
    expressions (with TensorRT's cdiv)."""
    return (x_shape[0], cdiv(out_tokens, BLOCK_ROWS)), (x_shape[1], x_shape[2], src_shape[1], unm_shape[1])


def merge_constants(protected: int) -> dict:
    """merge_rows' compile-time parameters."""
    return {"PROTECTED": protected, "BLOCK_R": BLOCK_ROWS, "BLOCK_K": BLOCK_MATCHES, "BLOCK_C": BLOCK_CHANNELS}


def tome_merge_kernel(x, size, src_idx, dst_idx, unm_idx, protected: int, launch=None):
    """Same result as tome_merge_reference: tokens [prefix, unmerged A in order, every B]."""
    batch, tokens, channels = x.shape
    x, size = x.contiguous(), size.contiguous()
    src, dst, unm = (index.reshape(batch, -1).contiguous() for index in (src_idx, dst_idx, unm_idx))
    out_tokens = protected + unm.shape[1] + (tokens - protected) // 2
    out = torch.empty(batch, out_tokens, channels, dtype=x.dtype, device=x.device)
    out_size = torch.empty(batch, out_tokens, 1, dtype=size.dtype, device=x.device)
    grid, scalars = merge_launch(x.shape, src.shape, unm.shape, out_tokens)
    _launch(launch, merge_rows)[grid](x, size, src, dst, unm, *scalars, out, out_size, **merge_constants(protected))
    return out, out_size
