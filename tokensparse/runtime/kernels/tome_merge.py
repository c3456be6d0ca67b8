"""ToMe's size-weighted merge (Bolya et al., ICLR 2023) as Triton kernels: scatter-add of the merged A
tokens into their B tokens, then normalisation by the summed sizes. The matching itself (a [N/2, N/2]
similarity, max and sort) stays in PyTorch; this is the gather/scatter part TensorRT lacks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokensparse.runtime.kernels.launch import launch as _launch

from tokensparse.policies.tome import merge_tokens


def tome_merge_reference(x, size, src_idx, dst_idx, unm_idx, protected: int):
    """The policy's own PyTorch merge (indices [B, *, 1] as bipartite_soft_matching returns them)."""
    return merge_tokens(x, size, src_idx, dst_idx, unm_idx, protected)


@triton.jit
def _copy_rows(
    x_ptr,
    size_ptr,
    out_ptr,
    out_size_ptr,
    rows_ptr,
    n_rows,
    tokens,
    out_tokens,
    out_offset,
    channels,
    weight_by_size: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, out_offset + i] = x[b, rows[b, i]] (times its size when weight_by_size); sizes alike."""
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = i < n_rows
    row = tl.load(rows_ptr + b * n_rows + i, mask=valid, other=0)
    s = tl.load(size_ptr + b * tokens + row, mask=valid, other=1.0)
    target = b * out_tokens + out_offset + i
    tl.store(out_size_ptr + target, s, mask=valid)
    for start in range(0, channels, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        keep = valid[:, None] & (c < channels)[None, :]
        value = tl.load(x_ptr + (b * tokens + row)[:, None] * channels + c[None, :], mask=keep)
        if weight_by_size:
            value = value * s[:, None]
        tl.store(out_ptr + target[:, None] * channels + c[None, :], value, mask=keep)


@triton.jit
def _scatter_add_rows(
    x_ptr,
    size_ptr,
    out_ptr,
    out_size_ptr,
    src_ptr,
    dst_ptr,
    r,
    tokens,
    out_tokens,
    b_offset,
    channels,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, b_offset + dst[b, k]] += size[src] * x[src] and its size += size[src] (atomics)."""
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = k < r
    src = tl.load(src_ptr + b * r + k, mask=valid, other=0)
    dst = tl.load(dst_ptr + b * r + k, mask=valid, other=0)
    s = tl.load(size_ptr + b * tokens + src, mask=valid, other=0.0)
    target = b * out_tokens + b_offset + dst
    tl.atomic_add(out_size_ptr + target, s, mask=valid)
    for start in range(0, channels, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        keep = valid[:, None] & (c < channels)[None, :]
        value = tl.load(x_ptr + (b * tokens + src)[:, None] * channels + c[None, :], mask=keep)
        tl.atomic_add(out_ptr + target[:, None] * channels + c[None, :], value * s[:, None], mask=keep)


@triton.jit
def _normalise_rows(
    out_ptr, out_size_ptr, n_rows, out_tokens, first, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """out[b, first + j] /= size[b, first + j]."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = j < n_rows
    target = b * out_tokens + first + j
    s = tl.load(out_size_ptr + target, mask=valid, other=1.0)
    for start in range(0, channels, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        keep = valid[:, None] & (c < channels)[None, :]
        pointers = out_ptr + target[:, None] * channels + c[None, :]
        tl.store(pointers, tl.load(pointers, mask=keep) / s[:, None], mask=keep)


def tome_merge_kernel(
    x, size, src_idx, dst_idx, unm_idx, protected: int, block_r: int = 32, block_c: int = 64, launch=None
):
    """Same result as tome_merge_reference: tokens [prefix, unmerged A in order, every B]."""
    batch, tokens, channels = x.shape
    x, size = x.contiguous(), size.contiguous()
    rest = tokens - protected
    b_count = rest // 2
    r, kept_a = src_idx.shape[1], unm_idx.shape[1]
    out_tokens = protected + kept_a + b_count
    out = torch.empty(batch, out_tokens, channels, dtype=x.dtype, device=x.device)
    out_size = torch.empty(batch, out_tokens, 1, dtype=size.dtype, device=x.device)
    positions = torch.arange(tokens, device=x.device)
    prefix_rows = positions[:protected].expand(batch, protected)
    a_rows = protected + 2 * unm_idx.reshape(batch, kept_a)  # A tokens sit at even offsets
    b_rows = (protected + 1 + 2 * positions[:b_count]).expand(batch, b_count)
    src_rows = protected + 2 * src_idx.reshape(batch, r)
    dst = dst_idx.reshape(batch, r)
    tiles = {"BLOCK_R": block_r, "BLOCK_C": min(block_c, triton.next_power_of_2(channels))}

    def grid(rows):
        return (batch, triton.cdiv(rows, block_r))

    for rows, offset, weighted in (
        (prefix_rows, 0, False),
        (a_rows, protected, False),
        (b_rows, protected + kept_a, True),
    ):
        if rows.shape[1]:
            rows = rows.contiguous()
            _launch(launch, _copy_rows)[grid(rows.shape[1])](
                x,
                size,
                out,
                out_size,
                rows,
                rows.shape[1],
                tokens,
                out_tokens,
                offset,
                channels,
                weight_by_size=weighted,
                **tiles,
            )
    if r:
        _launch(launch, _scatter_add_rows)[grid(r)](
            x,
            size,
            out,
            out_size,
            src_rows.contiguous(),
            dst.contiguous(),
            r,
            tokens,
            out_tokens,
            protected + kept_a,
            channels,
            **tiles,
        )
    if b_count:
        _launch(launch, _normalise_rows)[grid(b_count)](
            out, out_size, b_count, out_tokens, protected + kept_a, channels, **tiles
        )
    return out, out_size
