"""DivPrune (Alvar et al., CVPR 2025): keep the k most diverse visual tokens by greedy max-min cosine
distance. Plain PyTorch step functions; the VLM pass that splices them in comes with the VLM issue."""

from __future__ import annotations

import torch


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """D_ij = 1 - cos(x_i, x_j) for features [B, N, C] -> [B, N, N]."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    return 1 - unit @ unit.transpose(-1, -2)


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the kept tokens in original order. First the token farthest from its nearest
    neighbour, then repeatedly the token farthest from the chosen set; a running minimum makes each step
    O(N) (O(kN) in all after the distance matrix)."""
    batch, tokens, _ = features.shape
    if not 1 <= k <= tokens:
        raise ValueError(f"k={k} is out of range: it must be in 1..{tokens}")
    distances = cosine_distances(features.float())
    eye = torch.eye(tokens, dtype=torch.bool, device=features.device)
    first = distances.masked_fill(eye, torch.inf).min(dim=-1).values.argmax(dim=-1)          # [B]
    rows = torch.arange(batch, device=features.device)
    chosen = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    picks = [first]
    chosen[rows, first] = True
    to_set = distances[rows, first]                   # [B, N]: distance of each token to the chosen set
    for _ in range(k - 1):
        candidate = to_set.masked_fill(chosen, -torch.inf).argmax(dim=-1)
        picks.append(candidate)
        chosen[rows, candidate] = True
        to_set = torch.minimum(to_set, distances[rows, candidate])
    return torch.stack(picks, dim=1).sort(dim=1).values
