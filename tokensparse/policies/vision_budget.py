"""Vision and text KV budgets (GUI-KV, Huang et al., 2025; the training-free counterpart of Dynamic-LLaVA's
decode sparsification): once, after prefill, each layer and KV head keeps its best vision positions and its
best text positions under separate budgets, scored by SnapKV's pooled window attention plus, as options,
GUI-KV's saliency alpha * softmax(||h||_2 / T) over the current screenshot's positions and its temporal
redundancy (earlier screenshots' most redundant keys evicted first); the window is always kept."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.fastv import _traced
from tokensparse.policies.kv_policy import KVPolicy, check_budget, kept_positions, score_ranks
from tokensparse.policies.op_shapes import data_dependent_count
from tokensparse.policies.screenshot_redundancy import current_screenshot, redundant_positions
from tokensparse.policies.snapkv import check_window_scoring, snapkv_scores


@dataclass(frozen=True)
class VisionBudget(KVPolicy):
    """GUI-KV-style split budgets (Huang et al., 2025): after prefill keep `vision` vision positions and `text`
    text positions (each a count, or a fraction of that kind's positions before the window) per layer and KV
    head, ranked by SnapKV's score (window, kernel, pooling) plus alpha * softmax(||h||_2 / temperature)
    over the vision positions (h: the hidden states the attention reads); the window is always kept."""

    vision: Union[int, float] = 0.25
    text: Union[int, float] = 1.0
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    alpha: float = 0.0
    temperature: float = 1.0
    temporal_rank: int = 0

    name = "vision_budget"
    count_from_selection = True
    context_inputs = ("image_mask", "hidden")

    def __post_init__(self):
        check_budget("vision", self.vision, 0)
        check_budget("text", self.text, 0)
        check_window_scoring(self.window, self.kernel, self.pooling)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or self.alpha < 0:
            raise ValueError(f"alpha={self.alpha!r} must be a number >= 0 (the saliency term's weight)")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) \
                or self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be a number > 0")
        check_int_at_least("temporal_rank", self.temporal_rank, 0)

    def kept_count(self, cache_length: int):
        return None                              # depends on how many positions are vision tokens

    def evicts(self, query_length: int, cache_length: int) -> bool:
        return query_length > 1 and not self.is_identity(0) and cache_length > self.window

    def keep(self, query, keys, scale, count=None, scores=None, padding=None, image_mask=None, hidden=None):
        return vision_budget_keep(query, keys, scale, image_mask, hidden, self.vision, self.text, self.window,
                                  self.kernel, self.pooling, self.alpha, self.temperature, padding, self.temporal_rank)

    def is_identity(self, depth: int) -> bool:
        return all(isinstance(b, float) and b == 1.0 for b in (self.vision, self.text))

    def keeps_all_up_to(self) -> int:
        return self.window

    def graph_selection(self, site):
        budgets = (float(self.vision), isinstance(self.vision, int), float(self.text), isinstance(self.text, int))
        return VISION_BUDGET_KEEP, (site.query, site.keys, site.scale(), site.image_mask(),
                                    site.hidden() if self.alpha else None, *budgets, self.window, self.kernel,
                                    self.pooling, float(self.alpha), float(self.temperature), site.padding,
                                    self.temporal_rank)


def vision_saliency(hidden: torch.Tensor, image_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """GUI-KV's saliency [B, L]: softmax over each sample's positions in image_mask [B, L] bool (the current
    screenshot's) of ||h||_2 / temperature, zero elsewhere. hidden [B, L, D]."""
    norms = hidden.float().norm(dim=-1) / temperature
    return norms.masked_fill(~image_mask, -torch.inf).softmax(dim=-1).nan_to_num(0.0)


def vision_budget_keep(q: torch.Tensor, keys: torch.Tensor, scale: float, image_mask: Optional[torch.Tensor],
                       hidden: Optional[torch.Tensor], vision: Union[int, float], text: Union[int, float],
                       window: int, kernel: int = 5, pooling: str = "avg", alpha: float = 0.0,
                       temperature: float = 1.0, padding: Optional[torch.Tensor] = None,
                       temporal_rank: int = 0) -> torch.Tensor:
    """Kept positions [B, H_kv, K], ascending: per kind (vision, text) before the window, that kind's budget of
    best-scored positions (ties to the lower position), then the window. temporal_rank > 0: the earlier
    screenshots' most redundant positions (screenshot_redundancy.redundant_positions) rank below every other
    vision position. image_mask [B, L] bool (None: all text); every sample must hold the same number of vision
    positions before the window. Padding (padding [B, L]) counts as text for the text budget, but a padded
    sample's text slots that its real text cannot fill take its next-best vision positions first: padding stays
    only where every real position does."""
    batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[2]
    window = torch.sym_min(torch.sym_min(window, length), q.shape[2])
    if image_mask is None:
        image_mask = torch.zeros(batch, length, dtype=torch.bool, device=keys.device)
    before = image_mask[:, : length - window]
    counts = before.sum(dim=-1)
    if not _traced(counts) and bool((counts != counts[0]).any()):
        raise ValueError(f"vision KV budgets need the same number of vision positions in every sample; this batch "
                         f"holds {counts.tolist()}")
    scores = snapkv_scores(q[:, :, -window:], keys, scale, kernel, pooling, padding)      # [B, H_kv, L - w]
    if alpha and hidden is not None:
        saliency = vision_saliency(hidden, current_screenshot(image_mask), temperature)
        scores = scores + alpha * saliency[:, None, : length - window]
    if padding is not None:     # below every real position, above the other kind's (-inf) in each ranking
        scores = scores.masked_fill(padding[:, None, : length - window], torch.finfo(scores.dtype).min)
    # Counts as [B, 1, 1] tensors, never read into Python: torch.export and ONNX trace this function as it is.
    vision_count = _budget_count(vision, counts)[:, None, None]
    text_count = _budget_count(text, length - window - counts)[:, None, None]
    pads = torch.zeros_like(before) if padding is None else padding[:, : length - window]
    real_text = ~before & ~pads
    # Text slots that a padded sample's real text cannot fill go to its next-best vision positions, and only what
    # neither kind fills to padding (its first positions): padding stays only where every real position does.
    shortfall = (text_count - real_text.sum(dim=-1)[:, None, None]).clamp(min=0)
    if temporal_rank:           # below every other vision position (scores >= 0), still ranked among them
        evicted = (counts - vision_count[:, 0, 0] - shortfall[:, 0, 0]).clamp(min=0)
        scores = scores.masked_fill(redundant_positions(keys, image_mask, before, evicted, temporal_rank), -1.0)
    spill = (vision_count + shortfall - counts[:, None, None]).clamp(min=0)
    kept = ((score_ranks(scores, before) < vision_count + shortfall) & before[:, None, :]) \
        | ((score_ranks(scores, real_text) < text_count) & real_text[:, None, :]) \
        | ((score_ranks(torch.zeros_like(scores), pads) < spill) & pads[:, None, :])
    return kept_positions(torch.cat([kept, kept.new_ones(batch, kv_heads, window)], dim=-1))


def _budget_count(budget: Union[int, float], available: torch.Tensor) -> torch.Tensor:
    """budget_count on a tensor of available positions: a count (at most all), or round(fraction * available)."""
    if isinstance(budget, numbers.Integral):
        return available.clamp(max=int(budget))
    return torch.round(budget * available).long().clamp(max=available)


@torch.library.custom_op("tokensparse::vision_budget_keep", mutates_args=())
def vision_budget_keep_op(q: Tensor, keys: Tensor, scale: float, image_mask: Optional[Tensor], hidden: Optional[Tensor],
                          vision: float, vision_is_count: bool, text: float, text_is_count: bool, window: int,
                          kernel: int, pooling: str, alpha: float, temperature: float,
                          padding: Optional[Tensor] = None, temporal_rank: int = 0) -> Tensor:
    """Kept cache positions [B, H_kv, K] under separate vision and text budgets (a count, or a fraction of
    that kind's positions); K depends on how many positions are vision tokens (padding [B, L] is text, kept
    last; temporal_rank > 0: earlier screenshots' redundant positions evicted first)."""
    return vision_budget_keep_call(q, keys, scale, image_mask, hidden, vision, vision_is_count, text, text_is_count,
                                   window, kernel, pooling, alpha, temperature, padding, temporal_rank)


def vision_budget_keep_call(q, keys, scale, image_mask, hidden, vision, vision_is_count, text, text_is_count, window,
                            kernel, pooling, alpha, temperature, padding=None, temporal_rank=0):
    """vision_budget_keep called with the op's arguments (each budget a float and whether it is a count)."""
    return vision_budget_keep(q, keys, scale, image_mask, hidden, int(vision) if vision_is_count else vision,
                              int(text) if text_is_count else text, window, kernel, pooling, alpha, temperature,
                              padding, temporal_rank)


@vision_budget_keep_op.register_fake
def _vision_budget_keep_fake(q, keys, scale, image_mask, hidden, vision, vision_is_count, text, text_is_count,
                             window, kernel, pooling, alpha, temperature, padding=None, temporal_rank=0):
    return keys.new_empty(keys.shape[0], keys.shape[1], data_dependent_count(), dtype=torch.int64)


VISION_BUDGET_KEEP = torch.ops.tokensparse.vision_budget_keep.default
