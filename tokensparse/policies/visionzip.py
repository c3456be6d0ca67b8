"""VisionZip (Yang et al., 2024): at the vision encoder's feature layer keep the dominant tokens (most
attended by CLS, or most attended overall without CLS) and merge the rest into a few contextual tokens.
Plain PyTorch step functions; fx/passes/zip_vision_features.py splices them into a VLM's graph and the
language-model pass drops the other image positions before decoder layer 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.language import LanguagePolicy, Stage, check_positions
from tokensparse.policies.op_shapes import kept_sequence_positions
from tokensparse.policies.selection import rank_order, top_k_in_order


@dataclass(frozen=True)
class VisionZip(LanguagePolicy):
    """VisionZip (Yang et al., 2024): the language model receives `dominant` image tokens most attended at
    the encoder's feature layer plus `contextual` tokens merged from the rest (defaults: 54 + 10 of 576)."""

    dominant: int = 54
    contextual: int = 10
    positions: str = "original"

    name = "visionzip"
    stage_in_tower = True

    def __post_init__(self):
        check_positions(self.positions)
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
    kept = top_k_in_order(scores, dominant)                                                  # [B, dominant]
    rows = [torch.arange(protected, device=hidden.device).expand(batch, -1), kept + protected]
    if contextual:
        targets, merged = _contextual_tokens(hidden[:, protected:], keys[:, protected:], kept, contextual)
        targets = targets + protected
        hidden = hidden.scatter(1, targets.unsqueeze(-1).expand(-1, -1, channels), merged)
        rows.append(targets)
    return hidden, torch.cat(rows, dim=1).sort(dim=1).values


def _contextual_tokens(hidden, keys, kept, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Among the tokens not kept, `count` targets at a uniform stride; every other remaining token joins
    its most cosine-similar target. Returns (targets [B, count], target + mean of the tokens that joined).
    Static shapes only (a stable sort lists the remaining tokens), so that torch.export and ONNX trace it."""
    batch, patches, channels = hidden.shape
    left = patches - kept.shape[1]
    remaining_mask = torch.ones(batch, patches, dtype=torch.int8, device=hidden.device).scatter(1, kept, 0)
    remaining = rank_order(remaining_mask)[:, :left]                                           # [B, R] ascending
    stride = left // count
    is_target = [slot % stride == 0 and slot // stride < count for slot in range(left)]
    targets = remaining[:, [slot for slot in range(left) if is_target[slot]]]
    others = remaining[:, [slot for slot in range(left) if not is_target[slot]]]
    metric = torch.nn.functional.normalize(keys, dim=-1)
    gather = lambda source, index: source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))  # noqa: E731
    similarity = gather(metric, others) @ gather(metric, targets).transpose(1, 2)              # [B, O, T]
    assignment = similarity.argmax(dim=-1)                                                       # [B, O]
    sums = torch.zeros(batch, count, channels, dtype=hidden.dtype, device=hidden.device)
    sums = sums.scatter_add(1, assignment.unsqueeze(-1).expand(-1, -1, channels), gather(hidden, others))
    counts = torch.zeros(batch, count, 1, dtype=hidden.dtype, device=hidden.device)
    counts = counts.scatter_add(1, assignment.unsqueeze(-1), torch.ones_like(assignment, dtype=hidden.dtype).unsqueeze(-1))
    return targets, gather(hidden, targets) + sums / counts.clamp_min(1)


def visionzip_from_attention(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, dominant: int,
                             contextual: int, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """visionzip_select with the scores and keys of the layer's q, k [B, H, N, d]: the attention each patch
    receives (from CLS, or from every token without a prefix) and the keys averaged over heads."""
    from tokensparse.policies.topk import attention_received

    scores = attention_received(q, k, scale, protected)
    return visionzip_select(hidden, scores, k.mean(dim=1), dominant, contextual, protected)


def image_positions_of_rows(image_mask: torch.Tensor, rows: torch.Tensor, offset: int) -> torch.Tensor:
    """Positions [B, S'] ascending: every text position and the image positions that feature rows `rows`
    [B, k] of each sample's encoder output fill. Rows before `offset` were cut before the projector (CLS);
    row r >= offset fills the sample's (r - offset)-th image position."""
    from tokensparse.policies.fastv import positions_kept

    batch = image_mask.shape[0]
    where = image_mask.nonzero()[:, 1].view(batch, -1)                                   # [B, n] image positions
    features = rows[:, offset:] - offset          # rows ascend and the first are the prefix, always kept
    return positions_kept(image_mask, where.gather(1, features))


def image_rows_keep(image_mask: torch.Tensor, rows: torch.Tensor, offset: int, features: int,
                    counts_checked: bool = False) -> torch.Tensor:
    """image_positions_of_rows, after checking (eagerly) that every sample holds `features` image tokens (checked
    whatever `counts_checked` says: the argument is the op's, which only the inlined step reads)."""
    from tokensparse.policies.fastv import _traced, image_count

    if not _traced(image_mask):
        count = image_count(image_mask)
        if count != features:
            raise ValueError(f"each sample holds {count} image tokens but its image has {features} features: "
                             f"VisionZip maps one image per sample")
    return image_positions_of_rows(image_mask, rows, offset)


def image_rows_keep_step(image_mask: torch.Tensor, rows: torch.Tensor, offset: int, features: int,
                         counts_checked: bool = False) -> torch.Tensor:
    """image_rows_keep as compiled code sees it (what inline_steps.py puts in for KEEP_IMAGE_ROWS before Inductor):
    traced, a sample without `features` image tokens fails a runtime check (eagerly image_rows_keep's ValueError;
    no check with `counts_checked`: the caller checked that the samples hold equally many, and the model that they
    hold as many as the features), the image positions come from a stable sort rather than nonzero, and the kept
    length is static: the text tokens (S - features) plus the kept feature rows, distinct and ascending."""
    from tokensparse.policies.fastv import _traced, true_positions

    if not _traced(image_mask):
        return image_rows_keep(image_mask, rows, offset, features)
    if not counts_checked:
        wrong = (image_mask.sum(dim=1) != features).sum().item()
        torch.ops.aten._assert_scalar(wrong == 0, f"a sample does not hold {features} image tokens, one per "
                                                  f"feature of its image: VisionZip maps one image per sample")
    where = true_positions(image_mask, features)          # [B, features]: the n-th is the n-th feature's position
    kept = (~image_mask).scatter(1, where.gather(1, rows[:, offset:] - offset), True)
    return true_positions(kept, image_mask.shape[1] - features + rows.shape[1] - offset)


@torch.library.custom_op("tokensparse::visionzip", mutates_args=())
def visionzip_op(hidden: Tensor, q: Tensor, k: Tensor, scale: float, dominant: int, contextual: int,
                 protected: int) -> tuple[Tensor, Tensor]:
    """VisionZip at an encoder layer's output hidden [B, N, C] from that layer's q, k [B, H, N, d]: (hidden'
    [B, N, C] with the contextual tokens at their targets' rows, kept rows [B, p + dominant + contextual])."""
    zipped, rows = visionzip_from_attention(hidden, q, k, scale, dominant, contextual, protected)
    return (zipped.clone() if zipped is hidden else zipped), rows          # outputs must not alias inputs


@visionzip_op.register_fake
def _visionzip_fake(hidden, q, k, scale, dominant, contextual, protected):
    return torch.empty_like(hidden), hidden.new_empty(hidden.shape[0], protected + dominant + contextual,
                                                      dtype=torch.int64)


@torch.library.custom_op("tokensparse::keep_image_rows", mutates_args=())
def keep_image_rows_op(image_mask: Tensor, rows: Tensor, offset: int, features: int,
                       counts_checked: bool = False) -> Tensor:
    """Positions [B, S'] kept: every text token and the image positions filled by the kept encoder rows
    `rows` (VisionZip). Each sample holds `features` image tokens, one per encoder row from `offset` on
    (`counts_checked`: the caller checked that the samples hold equally many)."""
    return image_rows_keep(image_mask, rows, offset, features)


@keep_image_rows_op.register_fake
def _keep_image_rows_fake(image_mask, rows, offset, features, counts_checked=False):
    return kept_sequence_positions(image_mask)


VISIONZIP = torch.ops.tokensparse.visionzip.default
KEEP_IMAGE_ROWS = torch.ops.tokensparse.keep_image_rows.default
