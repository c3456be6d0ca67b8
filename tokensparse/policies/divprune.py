"""DivPrune (Alvar et al., CVPR 2025): keep the k most diverse visual tokens by greedy max-min cosine
distance among the projected visual tokens, before the language model. Plain PyTorch step functions,
which the language-model pass (fx/passes/prune_sequence.py) splices in before decoder layer 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tokensparse.policies.base import check_fraction
from tokensparse.policies.language import LanguagePolicy, Stage, check_positions, check_vision_span
from tokensparse.policies.op_shapes import kept_sequence_positions


@dataclass(frozen=True)
class DivPrune(LanguagePolicy):
    """DivPrune (Alvar et al., CVPR 2025): keep `keep` of the vision tokens, the most diverse by greedy
    max-min cosine distance, before the language model."""

    keep: float = 0.098
    vision_span: Optional[tuple] = None
    positions: str = "original"

    name = "divprune"

    def __post_init__(self):
        check_positions(self.positions)
        check_fraction("keep", self.keep)
        object.__setattr__(self, "vision_span", check_vision_span(self.vision_span))

    def stages(self) -> list[Stage]:
        return [Stage(0, self.keep, "diversity")]


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """D_ij = 1 - cos(x_i, x_j) for features [B, N, C] -> [B, N, N], exactly symmetric: two mutual nearest
    neighbours then tie exactly (as in exact arithmetic) and the first pick's argmax takes the lower position,
    whatever the matmul's shape rounds (the whole sequence for export, the image tokens eagerly)."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    distances = 1 - unit @ unit.transpose(-1, -2)
    return (distances + distances.transpose(-1, -2)) / 2


def greedy_inputs(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What DivPrune's greedy selection of k of features [B, N, C] starts from: the cosine distances [B, N, N]
    and each token's distance to its nearest neighbour [B, N] (k checked against N)."""
    tokens = features.shape[1]
    if not 1 <= k <= tokens:
        raise ValueError(f"k={k} is out of range: it must be in 1..{tokens}")
    distances = cosine_distances(features.float())
    eye = torch.eye(tokens, dtype=torch.bool, device=features.device)
    return distances, distances.masked_fill(eye, torch.inf).min(dim=-1).values


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the kept tokens in original order. First the token farthest from its nearest
    neighbour, then repeatedly the token farthest from the chosen set; a running minimum makes each step
    O(N) (O(kN) in all after the distance matrix)."""
    batch, tokens, _ = features.shape
    distances, nearest = greedy_inputs(features, k)
    first = nearest.argmax(dim=-1)                                                           # [B]
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


def divprune_keep(features: torch.Tensor, image_mask: torch.Tensor, keep: float,
                  select=divprune_select, image_tokens: Optional[int] = None) -> torch.Tensor:
    """Positions [B, S'] ascending: every text position and the kept_image_count(n, keep) most diverse image
    positions of features [B, S, D] (every sample holds the same number n of image tokens). `select` is
    divprune_select or a kernel with its signature and result (runtime/kernels/divprune_greedy.py). With n given
    as `image_tokens` (the caller checked the counts), nothing is read to the host: stable sorts place the image
    and the kept positions, whose counts are known (otherwise one read counts the image tokens)."""
    from tokensparse.policies.fastv import image_count, kept_image_count, kept_length, true_positions

    _, sequence, channels = features.shape
    count = image_count(image_mask) if image_tokens is None else image_tokens
    where = true_positions(image_mask, count)                                       # [B, n] image positions
    images = features.gather(1, where.unsqueeze(-1).expand(-1, -1, channels))
    chosen = where.gather(1, select(images, kept_image_count(count, keep)))
    return true_positions((~image_mask).scatter(1, chosen, True), kept_length(sequence, count, keep))


def divprune_keep_in_sequence(features: torch.Tensor, image_mask: torch.Tensor, keep: float,
                              image_tokens: Optional[int] = None) -> torch.Tensor:
    """divprune_keep without data-dependent Python, for torch.export and ONNX: the same greedy selection over
    the whole sequence [B, S] with text positions never chosen, its k - 1 steps a while_loop (an ONNX Loop)
    whose trip count comes from the image mask (`image_tokens`, where given, is what the mask holds). Every
    sample must hold the same number of image tokens."""
    from torch._higher_order_ops import while_loop

    from tokensparse.policies.fastv import _ascending_positions, kept_image_counts

    batch, sequence, _ = features.shape
    distances = cosine_distances(features.float())                                     # [B, S, S]
    text = ~image_mask
    others = torch.eye(sequence, dtype=torch.bool, device=features.device) | text[:, None, :]
    nearest = distances.masked_fill(others, torch.inf).min(dim=-1).values.masked_fill(text, -torch.inf)
    positions = torch.arange(sequence, device=features.device)
    first = nearest.argmax(dim=-1, keepdim=True)                                       # [B, 1]
    chosen = positions == first                                                        # [B, S]
    to_set = distances.gather(1, first.unsqueeze(-1).expand(-1, -1, sequence)).squeeze(1)
    steps = (kept_image_counts(image_mask.sum(dim=1), keep).max() - 1).clamp_min(0)

    def more(step, chosen, to_set):
        return step < steps

    def pick(step, chosen, to_set):
        candidate = to_set.masked_fill(chosen | text, -torch.inf).argmax(dim=-1, keepdim=True)
        row = distances.gather(1, candidate.unsqueeze(-1).expand(-1, -1, sequence)).squeeze(1)
        return step + 1, chosen | (positions == candidate), torch.minimum(to_set, row)

    start = torch.zeros((), dtype=torch.int64, device=features.device)
    _, chosen, _ = while_loop(more, pick, (start, chosen, to_set))
    return _ascending_positions(text | chosen)


@torch.library.custom_op("tokensparse::keep_diverse_vision_tokens", mutates_args=())
def keep_diverse_vision_tokens_op(features: Tensor, image_mask: Tensor, keep: float,
                                  image_tokens: Optional[int] = None) -> Tensor:
    """Positions [B, S'] kept: every text token and `keep` of the image tokens by DivPrune's greedy
    max-min cosine distance of their features [B, S, D] (`image_tokens`: each sample's count, which the caller
    checked; then the kept count is known and nothing is read to the host)."""
    return divprune_keep(features, image_mask, keep, image_tokens=image_tokens)


@keep_diverse_vision_tokens_op.register_fake
def _keep_diverse_vision_tokens_fake(features, image_mask, keep, image_tokens=None):
    from tokensparse.policies.fastv import kept_length

    if image_tokens is None:
        return kept_sequence_positions(image_mask)
    return image_mask.new_empty(image_mask.shape[0], kept_length(image_mask.shape[1], image_tokens, keep),
                                dtype=torch.int64)


KEEP_DIVERSE = torch.ops.tokensparse.keep_diverse_vision_tokens.default
