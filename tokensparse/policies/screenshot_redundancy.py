"""GUI-KV's temporal redundancy scoring (Huang et al., 2025): the keys of earlier screenshots projected onto the
current screenshot's key subspace; a small residual marks a redundant position, evicted first. A screenshot is
a maximal run of vision positions (chat templates separate images by text or marker tokens); the current one
is each sample's last run."""

from __future__ import annotations

import torch

from tokensparse.policies.kv_policy import score_ranks

SPAN_TOLERANCE = 1e-4       # a residual below this fraction of its key's norm is rounding: the key is in the span


def screenshot_runs(image_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] int64: k at the positions of each sample's k-th run of vision positions (1, 2, ...), 0 at text."""
    before = torch.cat([torch.zeros_like(image_mask[:, :1]), image_mask[:, :-1]], dim=-1)
    starts = image_mask & ~before
    return starts.long().cumsum(dim=-1) * image_mask


def current_screenshot(image_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: each sample's last run of vision positions (none in a sample without vision positions)."""
    runs = screenshot_runs(image_mask)
    return image_mask & (runs == runs.amax(dim=-1, keepdim=True))


def orthonormal_rows(rows: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """[..., r, d]: Gram-Schmidt (each row orthogonalised twice) on rows [..., r, d] in order, so that the first
    j outputs span the first j inputs, as the leading columns of a QR factorisation of the rows' transpose do. A
    row that the ones before it span (to `tolerance` of its norm), or a zero row, gives a zero row. Standard ops
    only, unrolled over r, so that torch.export and ONNX trace it (ONNX has no QR)."""
    basis = rows[..., :0, :]
    for j in range(rows.shape[-2]):
        row = rows[..., j : j + 1, :]
        norm = row.norm(dim=-1, keepdim=True)
        for _ in range(2):
            row = row - (row @ basis.transpose(-1, -2)) @ basis
        left = row.norm(dim=-1, keepdim=True)
        independent = left > tolerance * norm
        row = torch.where(independent, row / left.clamp_min(torch.finfo(left.dtype).tiny), torch.zeros_like(row))
        basis = torch.cat([basis, row], dim=-2)
    return basis


def key_subspace_residuals(keys: torch.Tensor, current: torch.Tensor, rank: int) -> torch.Tensor:
    """[B, H_kv, L] float32: per position, the norm of its key's part orthogonal to the span of the current
    screenshot's first `rank` keys (fewer where the screenshot is shorter), per sample and KV head; 0 within
    SPAN_TOLERANCE of the key's norm. keys [B, H_kv, L, d], current [B, L] bool, one run per sample
    (current_screenshot)."""
    batch, kv_heads, length, dim = keys.shape
    rank = min(rank, dim)
    offsets = torch.arange(rank, device=keys.device)
    start = current.int().argmax(dim=-1)                                          # [B]
    index = (start[:, None] + offsets).clamp(max=length - 1)                      # [B, r]
    inside = (offsets < current.sum(dim=-1, keepdim=True))[:, None, :, None]      # [B, 1, r, 1]
    keys = keys.float()
    spanning = keys.gather(2, index[:, None, :, None].expand(batch, kv_heads, rank, dim)) * inside
    basis = orthonormal_rows(spanning)                                            # [B, H_kv, r, d]
    residuals = (keys - (keys @ basis.transpose(-1, -2)) @ basis).norm(dim=-1)
    # Within rounding of the key's norm counts as in the span: exact zeros, so that such keys tie (to the lower
    # position) instead of ranking by rounding noise (a current screenshot whose keys span the whole key space).
    return residuals.masked_fill(residuals <= SPAN_TOLERANCE * keys.norm(dim=-1), 0.0)


def redundant_positions(keys: torch.Tensor, image_mask: torch.Tensor, candidates: torch.Tensor,
                        evicted: torch.Tensor, rank: int) -> torch.Tensor:
    """[B, H_kv, N] bool over the first N = candidates.shape[1] positions: of the earlier screenshots' positions
    among `candidates` [B, N] (the vision positions a budget ranks), the round(evicted / candidates x earlier)
    with the smallest residuals (key_subspace_residuals; ties to the lower position), per sample and KV head:
    GUI-KV evicts (1 - budget) of the history first. evicted [B]: how many of the candidates the budget drops."""
    current = current_screenshot(image_mask)
    count = candidates.shape[1]
    earlier = candidates & ~current[:, :count]
    residuals = key_subspace_residuals(keys, current, rank)[:, :, :count]
    total = candidates.sum(dim=-1).clamp(min=1)
    # round-half-up of evicted * earlier / total, in integers
    dropped = (2 * evicted * earlier.sum(dim=-1) + total) // (2 * total)
    return (score_ranks(-residuals, earlier) < dropped[:, None, None]) & earlier[:, None, :]
