"""DTD, differential token drop (TimeChat-Online, Yao et al., 2025): before the language model, drop each
video patch whose feature lies within cosine similarity `tau` of the same patch in the previous frame.
The same patch of the previous frame is found from Qwen2-VL's 3-D M-RoPE position ids: the vision token
with equal height and width ids and the next smaller temporal id. Plain PyTorch step functions, which the
language-model pass (fx/passes/prune_sequence.py) splices in before decoder layer 0."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensparse.policies.language import LanguagePolicy, Stage
from tokensparse.policies.op_shapes import kept_sequence_positions


@dataclass(frozen=True)
class DTD(LanguagePolicy):
    """DTD (TimeChat-Online, Yao et al., 2025): drop a video patch whose feature is within cosine similarity
    `tau` of the same patch in the previous frame, before the language model; kept tokens keep their
    positions (3-D M-RoPE ids included)."""

    tau: float = 0.9

    name = "dtd"
    equal_image_counts = False  # the sample that keeps most sets the count (dtd_keep)

    def __post_init__(self):
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real):
            raise ValueError(f"tau={self.tau!r} must be a cosine similarity in [-1, 1]")
        if not -1 <= self.tau <= 1:
            raise ValueError(f"tau={self.tau!r} is out of range: a cosine similarity is in [-1, 1]")

    def stages(self) -> list[Stage]:
        return [Stage(0, self.tau, "temporal")]

    def is_identity(self, depth: int) -> bool:
        return self.tau >= 1        # no two features are more similar than identical ones


def previous_frame_positions(positions: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] the position of the same patch in the previous frame, -1 where there is none (text, images, a
    video's first frame). positions [3, B, S] are M-RoPE's (temporal, height, width) ids; vision_mask [B, S].
    Sorting the vision tokens by (height, width, temporal) puts each patch right after its previous frame."""
    temporal, height, width = positions.long().unbind(0)
    batch, sequence = vision_mask.shape
    index = torch.arange(sequence, device=vision_mask.device).expand(batch, -1)
    span = positions.max().clamp_min(0) + 1
    key = torch.where(vision_mask, (height * span + width) * span + temporal, -1 - index)
    order = key.sort(dim=1, stable=True).indices
    later, earlier = order[:, 1:], order[:, :-1]

    def at(values, where):
        return values.gather(1, where)

    same_patch = (at(vision_mask, later) & at(vision_mask, earlier) & (at(height, later) == at(height, earlier))
                  & (at(width, later) == at(width, earlier)) & (at(temporal, later) > at(temporal, earlier)))
    previous = torch.full_like(index, -1)
    return previous.scatter(1, later, torch.where(same_patch, earlier, -1))


def temporal_similarity(features: torch.Tensor, vision_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, S] cosine similarity of each vision token's feature [B, S, D] to the same patch in the previous
    frame; -inf where there is none (text, images, first frames: those are always kept)."""
    previous = previous_frame_positions(positions, vision_mask)
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    before = unit.gather(1, previous.clamp_min(0).unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    return torch.where(previous >= 0, (unit * before).sum(dim=-1), -math.inf)


def dtd_keep(features: torch.Tensor, vision_mask: torch.Tensor, positions: torch.Tensor, tau: float) -> torch.Tensor:
    """Positions [B, S'] ascending: every text position and the vision tokens not within `tau` of their previous
    frame. Samples keep the same number (a dense batch): the one that keeps most sets it, the others also keep
    their least similar dropped tokens. With one sample, or equal counts, that is exactly DTD."""
    from tokensparse.policies.fastv import first_ranked_positions

    similarity = temporal_similarity(features, vision_mask, positions)
    count = (vision_mask & (similarity <= tau)).sum(dim=1).max()
    order = similarity.masked_fill(~vision_mask, math.inf).sort(dim=1, stable=True).indices
    return first_ranked_positions(order, vision_mask, count)


@torch.library.custom_op("tokensparse::keep_changed_video_tokens", mutates_args=())
def keep_changed_video_tokens_op(features: Tensor, vision_mask: Tensor, positions: Tensor, tau: float) -> Tensor:
    """Positions [B, S'] kept: every text token and the vision tokens whose features [B, S, D] are not within
    cosine similarity `tau` of the same patch in the previous frame, found from the M-RoPE ids [3, B, S] (DTD)."""
    return dtd_keep(features, vision_mask, positions, tau)


@keep_changed_video_tokens_op.register_fake
def _keep_changed_video_tokens_fake(features, vision_mask, positions, tau):
    return kept_sequence_positions(vision_mask)


KEEP_CHANGED_VIDEO = torch.ops.tokensparse.keep_changed_video_tokens.default
