"""In-place KV-cache compaction: move the kept positions of each (batch, head) to the front of the
cache, in order, without a second buffer. One program per (batch, head) walks the kept positions in
ascending order, so a row is read before any program could overwrite it (kept[j] >= j); inside a tile, a
barrier between the loads and the stores keeps one warp from writing a row another warp has yet to read."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokensparse.runtime.kernels.launch import launch as _launch


def kv_compact_reference(cache, kept):
    """cache [B, H, S, d], kept [B, H, K] ascending: a new cache whose first K positions are the kept ones
    (positions K.. unchanged)."""
    out = cache.clone()
    out[:, :, : kept.shape[-1]] = cache.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, cache.shape[-1]))
    return out


@triton.jit
def _compact(cache_ptr, kept_ptr, length, k, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tiles of BLOCK_R kept positions in ascending order: a tile is read whole before it is written, and
    later tiles only read rows at or after their own positions, which no earlier tile wrote."""
    bh = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements
    base = cache_ptr + bh * length * dim
    for first in range(0, k, BLOCK_R):
        j = first + tl.arange(0, BLOCK_R)
        valid = j < k
        row = tl.load(kept_ptr + bh * k + j, mask=valid, other=0)
        for start in range(0, dim, BLOCK_D):
            d = start + tl.arange(0, BLOCK_D)
            keep = valid[:, None] & (d < dim)[None, :]
            value = tl.load(base + row[:, None] * dim + d[None, :], mask=keep)
            # kept = [1, 2]: element 0 reads row 1, which element 1 writes; on a GPU they may sit in
            # different warps, so every load of the tile finishes before any store.
            tl.debug_barrier()
            tl.store(base + j[:, None] * dim + d[None, :], value, mask=keep)


def kv_compact(cache, kept, block_r: int = 32, block_d: int = 64, launch=None):
    """Compact `cache` [B, H, S, d] in place to the positions `kept` [B, H, K] (ascending, unique);
    returns K, the new length."""
    batch, heads, length, dim = cache.shape
    if not cache.is_contiguous():
        raise ValueError("kv_compact works in place and needs a contiguous cache")
    if kept.shape[:2] != (batch, heads) or kept.shape[-1] > length:
        raise ValueError(f"kept has shape {tuple(kept.shape)}; [{batch}, {heads}, K <= {length}] was expected")
    k = kept.shape[-1]
    kept = kept.contiguous().to(torch.int64)
    _launch(launch, _compact)[(batch * heads,)](
        cache, kept, length, k, dim, BLOCK_R=block_r, BLOCK_D=min(block_d, triton.next_power_of_2(dim))
    )
    return k
