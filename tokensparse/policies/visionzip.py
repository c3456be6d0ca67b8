"""VisionZip (Yang et al., 2024): at the vision encoder's feature layer keep the dominant tokens (most
attended by CLS, or most attended overall without CLS) and merge the rest into a few contextual tokens.
Plain PyTorch step functions; passes/zip_vision_features.py splices them into a VLM's graph and the
language-model pass drops the other image positions before decoder layer 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.language import LanguagePolicy, Stage


@dataclass(frozen=True)
class VisionZip(LanguagePolicy):
    """VisionZip (Yang et al., 2024): the language model receives `dominant` image tokens most attended at
    the encoder's feature layer plus `contextual` tokens merged from the rest (defaults: 54 + 10 of 576)."""

    dominant: int = 54
    contextual: int = 10

    name = "visionzip"

    def __post_init__(self):
        check_int_at_least("dominant", self.dominant, 0)
        check_int_at_least("contextual", self.contextual, 0)
        if self.dominant + self.contextual == 0:
            raise ValueError("dominant=0, contextual=0 keeps no image token: use tokensparse.VisualExit to drop "
                             "them all")

    def stages(self) -> list[Stage]:
        return [Stage(0, 1.0, "encoder_attention")]

    def is_identity(self, depth: int) -> bool:
        return False            # whether every patch survives depends on the encoder, seen in the graph

    def patch_budget(self, prefix: int, prefix_in_features: bool, patches: int) -> int:
        """Dominant patch tokens to keep: `dominant` counts the encoder's prefix tokens (CLS) when the
        features handed to the language model include them. ValueError when the counts do not fit."""
        top = self.dominant - (prefix if prefix_in_features else 0)
        if top < 0 or top > patches or self.contextual > patches - top:
            raise ValueError(f"dominant={self.dominant}, contextual={self.contextual} do not fit the encoder's "
                             f"{patches} patch tokens ({prefix} prefix tokens, "
                             f"{'' if prefix_in_features else 'not '}among the features): dominant + contextual "
                             f"must be at most {patches + (prefix if prefix_in_features else 0)}")
        return top


def visionzip_select(hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, N, C]; scores [B, N - p] (attention each patch receives); keys [B, N, c] (the layer's keys
    averaged over heads). Returns (hidden' [B, N, C], rows [B, p + dominant + contextual] ascending): the
    kept rows are the prefix, the `dominant` best-scored patches and `contextual` targets taken at a uniform
    stride among the other patches; hidden' equals hidden except at the targets, which hold target + the
    mean of the remaining patches most cosine-similar (by key) to them. Every other row is dropped."""
    batch, tokens, channels = hidden.shape
    patches = tokens - protected
    if not 0 <= dominant <= patches or not 0 <= contextual <= patches - dominant:
        raise ValueError(f"dominant={dominant}, contextual={contextual} do not fit {patches} patch tokens after "
                         f"{protected} prefix tokens")
    kept = scores.topk(dominant, dim=-1).indices.sort(dim=-1).values                         # [B, dominant]
    rows = [torch.arange(protected, device=hidden.device).expand(batch, -1), kept + protected]
    if contextual:
        targets, merged = _contextual_tokens(hidden[:, protected:], keys[:, protected:], kept, contextual)
        targets = targets + protected
        hidden = hidden.scatter(1, targets.unsqueeze(-1).expand(-1, -1, channels), merged)
        rows.append(targets)
    return hidden, torch.cat(rows, dim=1).sort(dim=1).values


def _contextual_tokens(hidden, keys, kept, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Among the tokens not kept, `count` targets at a uniform stride; every other remaining token joins
    its most cosine-similar target. Returns (targets [B, count], target + mean of the tokens that joined)."""
    batch, patches, channels = hidden.shape
    remaining_mask = torch.ones(batch, patches, dtype=torch.bool, device=hidden.device)
    remaining_mask.scatter_(1, kept, False)
    remaining = remaining_mask.nonzero()[:, 1].view(batch, -1)                                   # [B, R]
    stride = remaining.shape[1] // count
    is_target = torch.zeros(remaining.shape[1], dtype=torch.bool, device=hidden.device)
    is_target[torch.arange(count, device=hidden.device) * stride] = True
    targets, others = remaining[:, is_target], remaining[:, ~is_target]
    metric = torch.nn.functional.normalize(keys, dim=-1)
    gather = lambda source, index: source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))  # noqa: E731
    similarity = gather(metric, others) @ gather(metric, targets).transpose(1, 2)              # [B, O, T]
    assignment = similarity.argmax(dim=-1)                                                       # [B, O]
    sums = torch.zeros(batch, count, channels, dtype=hidden.dtype, device=hidden.device)
    sums.scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, channels), gather(hidden, others))
    counts = torch.zeros(batch, count, 1, dtype=hidden.dtype, device=hidden.device)
    counts.scatter_add_(1, assignment.unsqueeze(-1), torch.ones_like(assignment, dtype=hidden.dtype).unsqueeze(-1))
    return targets, gather(hidden, targets) + sums / counts.clamp_min(1)


def image_positions_of_rows(image_mask: torch.Tensor, rows: torch.Tensor, offset: int) -> torch.Tensor:
    """Positions [B, S'] ascending: every text position and the image positions that feature rows `rows`
    [B, k] of each sample's encoder output fill. Rows before `offset` were cut before the projector (CLS);
    row r >= offset fills the sample's (r - offset)-th image position."""
    from tokensparse.policies.fastv import positions_kept

    batch = image_mask.shape[0]
    where = image_mask.nonzero()[:, 1].view(batch, -1)                                   # [B, n] image positions
    features = rows[rows >= offset].view(batch, -1) - offset
    return positions_kept(image_mask, where.gather(1, features))
