"""FastV (Chen et al., ECCV 2024): at decoder layer K keep every text token and the image tokens that
received the most attention in layer K-1 (mean over heads), from the last prompt token (the authors'
code) or from all text tokens (the paper). Plain PyTorch step functions, which the language-model pass
(fx/passes/prune_sequence.py) splices into the graph."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tokensparse.policies.base import check_fraction, check_int_at_least
from tokensparse.policies.language import LanguagePolicy, Stage, check_positions, check_vision_span
from tokensparse.policies.op_shapes import kept_sequence_positions
from tokensparse.policies.selection import rank_order

QUERIES = ("last", "text")


@dataclass(frozen=True)
class FastV(LanguagePolicy):
    """FastV (Chen et al., ECCV 2024): before decoder layer `layer` keep `keep` of the vision tokens, those
    most attended in the layer before (from the last token, or from all text tokens)."""

    layer: int = 2
    keep: float = 0.5
    query: str = "last"
    vision_span: Optional[tuple] = None
    positions: str = "original"

    name = "fastv"

    def __post_init__(self):
        check_positions(self.positions)
        check_int_at_least("layer", self.layer, 1)
        check_fraction("keep", self.keep)
        if self.query not in QUERIES:
            raise ValueError(f"query={self.query!r} is unknown: choose one of {list(QUERIES)}")
        object.__setattr__(self, "vision_span", check_vision_span(self.vision_span))

    def first_layer(self) -> int:
        return 1

    def stages(self) -> list[Stage]:
        return [Stage(self.layer, self.keep, "previous_attention", self.query)]


def fastv_scores(q: torch.Tensor, k: torch.Tensor, scale: float, image_mask: torch.Tensor,
                 query: str = "last", attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention received by each position [B, S] from the chosen query rows, mean over heads (and rows),
    causal; recomputed from q [B, H, S, d] and k [B, H_kv, S, d] for those rows only. `attn_mask` is the
    layer's own mask ([B or 1, 1 or H, S, S], bool or additive; None means causal only)."""
    if query not in QUERIES:
        raise ValueError(f"query={query!r} is not one of {QUERIES}")
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    q, k = q.float(), k.float()
    sequence = q.shape[2]
    if query == "last":
        logits = q[:, :, -1:] @ k.transpose(-1, -2) * scale                           # [B, H, 1, S]
        if attn_mask is None:
            return logits.softmax(dim=-1).mean(dim=1)[:, 0]
        last_row = attn_mask[..., -1:, :]
        probabilities = _masked(logits, last_row).softmax(dim=-1)
        # A last row that sees nothing (right padding) gives no scores rather than NaN.
        return probabilities.masked_fill(~attended(last_row).any(dim=-1, keepdim=True), 0.0).mean(dim=1)[:, 0]
    logits = q @ k.transpose(-1, -2) * scale                                          # all rows, then keep text rows
    if attn_mask is None:
        causal = torch.ones(sequence, sequence, dtype=torch.bool, device=q.device).tril()
        return text_row_mean(logits.masked_fill(~causal, -math.inf).softmax(dim=-1), image_mask)
    allowed = attended(attn_mask)
    probabilities = _masked(logits, attn_mask).softmax(dim=-1)
    padding_rows = ~allowed.any(dim=-1)[:, 0]                                         # [B, S] rows that see nothing
    probabilities = probabilities.masked_fill(padding_rows[:, None, :, None], 0.0)
    return text_row_mean(probabilities, image_mask | padding_rows)


def attended(attn_mask: torch.Tensor) -> torch.Tensor:
    """Where an attention mask (bool, or additive with -inf or the dtype's minimum) lets a query see a key."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of `dtype` (0 where allowed, the dtype's minimum elsewhere) for a bool mask: attended's
    inverse, for eager attention."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                     torch.finfo(dtype).min)


def _masked(logits: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Logits with the mask applied: masked keys at -inf, an additive mask's other values added."""
    if attn_mask.dtype != torch.bool:
        logits = logits + attn_mask.float()
    return logits.masked_fill(~attended(attn_mask), -math.inf)


def text_row_mean(probabilities: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Attention received [B, S]: probabilities [B, H, S, S] averaged over heads and over the text rows (the
    rows where image_mask [B, S] is False; padding rows are passed as True, they do not vote)."""
    probabilities = probabilities.mean(dim=1)
    text_rows = (~image_mask).to(probabilities.dtype).unsqueeze(-1)
    return (probabilities * text_rows).sum(dim=1) / text_rows.sum(dim=1).clamp_min(1)


def kept_image_count(image_tokens: int, keep: float) -> int:
    """round(keep * N_vision) (in float32 and to even, as kept_image_counts and exported graphs compute it), at
    least one; keep=0 keeps none (visual-token exit). Plain Python: compiled code calls it while tracing."""
    if keep == 0 or image_tokens == 0:
        return 0
    return min(image_tokens, max(1, round(_float32(_float32(image_tokens) * _float32(keep)))))


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def kept_image_counts(counts: torch.Tensor, keep: float) -> torch.Tensor:
    """kept_image_count for a tensor of image-token counts, in tensor ops that torch.export and ONNX trace."""
    if keep == 0:
        return torch.zeros_like(counts)
    kept = torch.round(counts.float() * keep).clamp_min(1).to(counts.dtype)
    return torch.where(counts == 0, counts, kept)


def kept_length(sequence, image_tokens: int, keep: float):
    """The sequence length after a stage that keeps kept_image_count(image_tokens, keep) of a sample's image tokens
    and every other position."""
    return sequence - image_tokens + kept_image_count(image_tokens, keep)


def image_count(image_mask: torch.Tensor) -> int:
    """The number of image tokens per sample (one read to the host); every sample must hold the same number."""
    counts = image_mask.sum(dim=1).tolist()
    if any(count != counts[0] for count in counts):
        raise ValueError(f"samples hold different numbers of image tokens ({counts}); pruning inside "
                         f"the language model needs equal counts per batch")
    return counts[0]


def fastv_keep(scores: torch.Tensor, image_mask: torch.Tensor, keep: float,
               image_tokens: Optional[int] = None) -> torch.Tensor:
    """Positions [B, S'] kept from layer K on, ascending: every text position and the kept_image_count
    best-scored image positions (ties to the lower position). Every sample must hold the same number of
    image tokens (`image_tokens` where the caller knows it). Data-dependent only through nonzero, so that
    torch.export and ONNX trace it."""
    if not _traced(image_mask):
        count = image_count(image_mask)                          # unequal counts: a clear error, eagerly
        if image_tokens is not None and count != image_tokens:
            raise ValueError(f"samples hold {count} image tokens each where the compiled graph expects "
                             f"{image_tokens} (the image features' rows per sample)")
    order = rank_order(scores.float().masked_fill(~image_mask, -math.inf))
    return first_ranked_positions(order, image_mask, kept_image_counts(image_mask.sum(dim=1, keepdim=True), keep))


def fastv_keep_step(scores: torch.Tensor, image_mask: torch.Tensor, keep: float,
                    image_tokens: Optional[int] = None) -> torch.Tensor:
    """fastv_keep as compiled code sees it (what inline_steps.py puts in for KEEP_VISION before Inductor). Traced
    with `image_tokens` (each sample's count, which the caller checked before the graph ran): the kept length is
    known, S - n + kept_image_count(n), and nothing is read to the host. Without: unequal image-token counts fail
    a runtime check (eagerly image_count's ValueError), since the kept positions would not fill the dense [B, S']
    layout, and the kept length is read once from the first sample (a reshape of nonzero's flat result would
    guard on its divisibility by a symbolic batch)."""
    if not _traced(image_mask):
        return fastv_keep(scores, image_mask, keep, image_tokens)
    order = rank_order(scores.float().masked_fill(~image_mask, -math.inf))
    if image_tokens is not None:
        kept = _first_ranked(order, image_mask, kept_image_count(image_tokens, keep))
        return true_positions(kept, kept_length(image_mask.shape[1], image_tokens, keep))
    counts = image_mask.sum(dim=1, keepdim=True)
    unequal = (counts != counts[:1]).sum().item()
    torch.ops.aten._assert_scalar(unequal == 0, "samples hold different numbers of image tokens; pruning inside "
                                                "the language model needs equal counts per batch")
    kept = _first_ranked(order, image_mask, kept_image_counts(counts, keep))
    length = kept[:1].sum().item()
    torch._check(length >= 1)            # as the op's fake says (op_shapes.data_dependent_count)
    torch._check(length <= kept.shape[1])
    return true_positions(kept, length)


def first_ranked_positions(order: torch.Tensor, image_mask: torch.Tensor, counts) -> torch.Tensor:
    """[B, S'] ascending: every text position and the first `counts` (a number, or [B, 1]) image positions of
    each row's ranking `order` [B, S] (a permutation of the positions, image positions first)."""
    return _ascending_positions(_first_ranked(order, image_mask, counts))


def _first_ranked(order: torch.Tensor, image_mask: torch.Tensor, counts) -> torch.Tensor:
    """[B, S] bool: first_ranked_positions' kept positions."""
    batch, sequence = image_mask.shape
    ranks = torch.arange(sequence, device=order.device).expand(batch, -1)
    rank = torch.empty_like(order).scatter(1, order, ranks)                 # each position's place in the order
    return ~image_mask | (rank < counts)


def positions_kept(image_mask: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """[B, S'] ascending: every text position plus the given image positions [B, k]."""
    return _ascending_positions((~image_mask).scatter(1, image_positions, True))


def true_positions(mask: torch.Tensor, count) -> torch.Tensor:
    """[B, count] ascending: the True positions of mask [B, S], `count` in every row (known to the caller), from a
    stable sort (True first) rather than nonzero, so that nothing is read to the host."""
    return (~mask).to(torch.uint8).sort(dim=1, stable=True).indices[:, :count]


def _ascending_positions(kept: torch.Tensor) -> torch.Tensor:
    """[B, S'] the True positions of kept [B, S] (the same count in every sample), contiguous."""
    return kept.nonzero()[:, 1].reshape(kept.shape[0], -1).clone(memory_format=torch.contiguous_format)


def _traced(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is being traced (torch.export, FakeTensor propagation) rather than computed."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor) or torch.compiler.is_compiling()


@torch.library.custom_op("tokensparse::keep_vision_tokens", mutates_args=())
def keep_vision_tokens_op(scores: Tensor, image_mask: Tensor, keep: float, image_tokens: Optional[int] = None) -> Tensor:
    """Positions [B, S'] kept: every text token and `keep` of the image tokens by score (FastV,
    PyramidDrop; keep=0 drops every image token). The count depends on the data (the image tokens), unless the
    caller gives each sample's image-token count."""
    return fastv_keep(scores, image_mask, keep, image_tokens)


@keep_vision_tokens_op.register_fake
def _keep_vision_tokens_fake(scores, image_mask, keep, image_tokens=None):
    if image_tokens is None:
        return kept_sequence_positions(image_mask)
    return image_mask.new_empty(image_mask.shape[0], kept_length(image_mask.shape[1], image_tokens, keep),
                                dtype=torch.int64)


KEEP_VISION = torch.ops.tokensparse.keep_vision_tokens.default
