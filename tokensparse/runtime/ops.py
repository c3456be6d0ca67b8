"""tokensparse:: custom ops for the policy steps. Inductor treats them as opaque calls (so compiling a
pruned model costs about what the unpruned one does), torch.export keeps them as single nodes, and
their eager implementations are the policies' own plain-PyTorch reference functions."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils import flop_counter

from tokensparse.policies.adaptive_kv import adaptive_keep
from tokensparse.policies.divprune import divprune_keep
from tokensparse.policies.dtd import dtd_keep
from tokensparse.policies.fastv import fastv_keep
from tokensparse.policies.h2o import h2o_keep, h2o_step_keep
from tokensparse.policies.kv_policy import attention_column_sums, evict_positions
from tokensparse.policies.snapkv import snapkv_keep
from tokensparse.runtime.static_cache import heavy_and_recent_, keep_sinks_and_window_
from tokensparse.policies.token_sources import features_at_source_rows
from tokensparse.policies.tome import merge_tokens, tome_step
from tokensparse.policies.selection import split_in_order, top_k_in_order
from tokensparse.policies.topk import topk_step
from tokensparse.policies.vision_budget import vision_budget_keep
from tokensparse.policies.visionzip import image_rows_keep, visionzip_from_attention


_symbolic_token_counts = [True]


@contextlib.contextmanager
def static_token_counts():
    """Trace the ops with static token counts (for FLOPs counting, where numbers must be concrete)."""
    _symbolic_token_counts.append(False)
    try:
        yield
    finally:
        _symbolic_token_counts.pop()


@torch.library.custom_op("tokensparse::tome_merge", mutates_args=())
def tome_merge(x: Tensor, size: Tensor, keys: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """ToMe step: merge r tokens of x [B, N, C] (sizes [B, N, 1]) by the block's keys [B, H, N, d]."""
    if r == 0:
        return x.clone(), size.clone()
    return tome_step(x, size, keys, r, protected)


def _token_count(count):
    """The output token count seen while tracing: a fresh unbacked size (at least 2, which the passes
    guarantee), so that Inductor generates one size-generic set of kernels shared by every block
    instead of one set per token count. A static count below 2 stays static."""
    if not _symbolic_token_counts[-1] or (isinstance(count, int) and count < 2):
        return count
    return torch.library.get_ctx().new_dynamic_size(min=2)


@tome_merge.register_fake
def _tome_merge_fake(x, size, keys, r, protected):
    batch, tokens, channels = x.shape
    out = _token_count(tokens - r)
    return x.new_empty(batch, out, channels), size.new_empty(batch, out, 1)


@torch.library.custom_op("tokensparse::topk_prune", mutates_args=())
def topk_prune(x: Tensor, q: Tensor, k: Tensor, scale: float, keep: int, protected: int, fuse: bool,
               attn_mask: Optional[Tensor] = None) -> Tensor:
    """Attention-rank step: keep the prefix and the `keep` most-attended tokens of x (+ a fused one)."""
    return topk_step(x, q, k, scale, keep, protected, fuse, attn_mask)


@topk_prune.register_fake
def _topk_prune_fake(x, q, k, scale, keep, protected, fuse, attn_mask=None):
    batch, _, channels = x.shape
    return x.new_empty(batch, _token_count(protected + keep + int(fuse)), channels)


@torch.library.custom_op("tokensparse::merge_matches", mutates_args=())
def merge_matches(x: Tensor, size: Tensor, src_idx: Tensor, dst_idx: Tensor, unm_idx: Tensor,
                  protected: int) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted merge for matches already made (indices [B, *, 1]): the TomeMergeRows plugin."""
    return merge_tokens(x, size, src_idx, dst_idx, unm_idx, protected)


@merge_matches.register_fake
def _merge_matches_fake(x, size, src_idx, dst_idx, unm_idx, protected):
    batch, tokens, channels = x.shape
    out = protected + unm_idx.shape[1] + (tokens - protected) // 2
    return x.new_empty(batch, out, channels), size.new_empty(batch, out, 1)


@torch.library.custom_op("tokensparse::select_top_k", mutates_args=())
def select_top_k(scores: Tensor, k: int) -> Tensor:
    """[B, k] int64: each row's k best scores' indices in token order (ties to the lower index, as ONNX TopK
    and the kernel): the TopKSelect plugin."""
    return top_k_in_order(scores, k)


@select_top_k.register_fake
def _select_top_k_fake(scores, k):
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("tokensparse::split_top_k", mutates_args=())
def split_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """([B, k], [B, N - k]) int64: each row's k best scores' indices and the others, both in token order
    (ties to the lower index): the TopKSplit plugin."""
    return split_in_order(scores, k)


@split_top_k.register_fake
def _split_top_k_fake(scores, k):
    batch, tokens = scores.shape
    return scores.new_empty(batch, k, dtype=torch.int64), scores.new_empty(batch, tokens - k, dtype=torch.int64)


@torch.library.custom_op("tokensparse::keep_vision_tokens", mutates_args=())
def keep_vision_tokens(scores: Tensor, image_mask: Tensor, keep: float) -> Tensor:
    """Positions [B, S'] kept: every text token and `keep` of the image tokens by score (FastV,
    PyramidDrop; keep=0 drops every image token). The count depends on the data (the image tokens)."""
    return fastv_keep(scores, image_mask, keep)


@keep_vision_tokens.register_fake
def _keep_vision_tokens_fake(scores, image_mask, keep):
    return _kept_sequence_positions(image_mask)


@torch.library.custom_op("tokensparse::keep_diverse_vision_tokens", mutates_args=())
def keep_diverse_vision_tokens(features: Tensor, image_mask: Tensor, keep: float) -> Tensor:
    """Positions [B, S'] kept: every text token and `keep` of the image tokens by DivPrune's greedy
    max-min cosine distance of their features [B, S, D]."""
    return divprune_keep(features, image_mask, keep)


@keep_diverse_vision_tokens.register_fake
def _keep_diverse_vision_tokens_fake(features, image_mask, keep):
    return _kept_sequence_positions(image_mask)


@torch.library.custom_op("tokensparse::keep_changed_video_tokens", mutates_args=())
def keep_changed_video_tokens(features: Tensor, vision_mask: Tensor, positions: Tensor, tau: float) -> Tensor:
    """Positions [B, S'] kept: every text token and the vision tokens whose features [B, S, D] are not within
    cosine similarity `tau` of the same patch in the previous frame, found from the M-RoPE ids [3, B, S] (DTD)."""
    return dtd_keep(features, vision_mask, positions, tau)


@keep_changed_video_tokens.register_fake
def _keep_changed_video_tokens_fake(features, vision_mask, positions, tau):
    return _kept_sequence_positions(vision_mask)


@torch.library.custom_op("tokensparse::visionzip", mutates_args=())
def visionzip(hidden: Tensor, q: Tensor, k: Tensor, scale: float, dominant: int, contextual: int,
              protected: int) -> tuple[Tensor, Tensor]:
    """VisionZip at an encoder layer's output hidden [B, N, C] from that layer's q, k [B, H, N, d]: (hidden'
    [B, N, C] with the contextual tokens at their targets' rows, kept rows [B, p + dominant + contextual])."""
    zipped, rows = visionzip_from_attention(hidden, q, k, scale, dominant, contextual, protected)
    return (zipped.clone() if zipped is hidden else zipped), rows          # outputs must not alias inputs


@visionzip.register_fake
def _visionzip_fake(hidden, q, k, scale, dominant, contextual, protected):
    return torch.empty_like(hidden), hidden.new_empty(hidden.shape[0], protected + dominant + contextual,
                                                      dtype=torch.int64)


@torch.library.custom_op("tokensparse::keep_image_rows", mutates_args=())
def keep_image_rows(image_mask: Tensor, rows: Tensor, offset: int, features: int) -> Tensor:
    """Positions [B, S'] kept: every text token and the image positions filled by the kept encoder rows
    `rows` (VisionZip). Each sample holds `features` image tokens, one per encoder row from `offset` on."""
    return image_rows_keep(image_mask, rows, offset, features)


@keep_image_rows.register_fake
def _keep_image_rows_fake(image_mask, rows, offset, features):
    return _kept_sequence_positions(image_mask)


@torch.library.custom_op("tokensparse::features_at_source_rows", mutates_args=())
def features_at_source_rows_op(hidden: Tensor, sources: Tensor) -> tuple[Tensor, Tensor]:
    """A vision-encoder policy's output tokens hidden [B, N', C] written at their first source rows (sources
    [B, N', N]) of a [B, N, C] zero tensor, and those rows ascending [B, N']."""
    return features_at_source_rows(hidden, sources)


@features_at_source_rows_op.register_fake
def _features_at_source_rows_fake(hidden, sources):
    batch, tokens, channels = hidden.shape
    return hidden.new_empty(batch, sources.shape[2], channels), hidden.new_empty(batch, tokens, dtype=torch.int64)


@torch.library.custom_op("tokensparse::snapkv_keep", mutates_args=())
def snapkv_keep_op(q: Tensor, keys: Tensor, scale: float, count: int, window: int, kernel: int,
                   pooling: str, padding: Optional[Tensor] = None) -> Tensor:
    """SnapKV's kept cache positions [B, H_kv, count] from the forward's queries q [B, H, S, d] and the
    cache's keys [B, H_kv, L, d] (padding [B, L]: a padded batch's padding, kept last)."""
    return snapkv_keep(q, keys, scale, count, window, kernel, pooling, padding)


@snapkv_keep_op.register_fake
def _snapkv_keep_fake(q, keys, scale, count, window, kernel, pooling, padding=None):
    return keys.new_empty(keys.shape[0], keys.shape[1], count, dtype=torch.int64)


@torch.library.custom_op("tokensparse::attention_column_sums", mutates_args=())
def attention_column_sums_op(q: Tensor, keys: Tensor, scale: float, padding: Optional[Tensor] = None,
                             positions: Optional[Tensor] = None, window: int = 0) -> Tensor:
    """[B, H_kv, L] float32: the attention the forward's queries q [B, H, S, d] (causal, the last S positions)
    give each cached key [B, H_kv, L, d], summed over the queries and averaged over each KV group (padding
    [B, L]: positions that neither draw nor ask attention; positions [B, H_kv, L] with a sliding window: each
    query sees the keys within the window of its position)."""
    return attention_column_sums(q, keys, scale, padding, positions, window)


@attention_column_sums_op.register_fake
def _attention_column_sums_fake(q, keys, scale, padding=None, positions=None, window=0):
    return keys.new_empty(keys.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tokensparse::h2o_keep", mutates_args=())
def h2o_keep_op(scores: Tensor, count: int, recent: int, padding: Optional[Tensor] = None) -> Tensor:
    """H2O's kept cache positions [B, H_kv, count] from accumulated scores [B, H_kv, L] (padding [B, L]
    kept last)."""
    return h2o_keep(scores, count, recent, padding)


@h2o_keep_op.register_fake
def _h2o_keep_fake(scores, count, recent, padding=None):
    return scores.new_empty(scores.shape[0], scores.shape[1], count, dtype=torch.int64)


@torch.library.custom_op("tokensparse::h2o_step_keep", mutates_args=())
def h2o_step_keep_op(scores: Tensor, count: int, recent: int, padding: Optional[Tensor] = None) -> Tensor:
    """h2o_keep at a decode step: without a sort while the cache [B, H_kv, L] is at most one position over
    `count` (as every decode step's is), else h2o_keep itself."""
    if scores.shape[-1] > count + 1:
        return h2o_keep(scores, count, recent, padding)
    return h2o_step_keep(scores, count, recent, padding)


@h2o_step_keep_op.register_fake
def _h2o_step_keep_fake(scores, count, recent, padding=None):
    return scores.new_empty(scores.shape[0], scores.shape[1], count, dtype=torch.int64)


@torch.library.custom_op("tokensparse::adaptive_keep", mutates_args=())
def adaptive_keep_op(q: Tensor, keys: Tensor, scale: float, tau: float, window: int,
                     padding: Optional[Tensor] = None) -> Tensor:
    """ZipVL's kept cache positions [B, H_kv, p]: p, data-dependent, is the fewest that hold `tau` of the last
    `window` queries' attention mass in every KV head (padding [B, L] holds none and is kept last)."""
    return adaptive_keep(q, keys, scale, tau, window, padding)


@adaptive_keep_op.register_fake
def _adaptive_keep_fake(q, keys, scale, tau, window, padding=None):
    return keys.new_empty(keys.shape[0], keys.shape[1], _kept_positions(), dtype=torch.int64)


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
    return keys.new_empty(keys.shape[0], keys.shape[1], _kept_positions(), dtype=torch.int64)


@torch.library.custom_op("tokensparse::keep_sinks_and_window", mutates_args=("keys", "values", "length"))
def keep_sinks_and_window_op(keys: Tensor, values: Tensor, length: Tensor, sinks: int, window: int,
                             padding: Optional[Tensor] = None) -> None:
    """StreamingLLM's eviction on a StaticCache layer's buffers [B, H_kv, max_len, d] and its filled length, in
    place, after a decode step's attention has read them (padding [B, max_len]: the slots holding padding)."""
    keep_sinks_and_window_(keys, values, length, sinks, window, padding)


@keep_sinks_and_window_op.register_fake
def _keep_sinks_and_window_fake(keys, values, length, sinks, window, padding=None):
    return None


@torch.library.custom_op("tokensparse::heavy_and_recent", mutates_args=("keys", "values", "scores", "length"))
def heavy_and_recent_op(keys: Tensor, values: Tensor, scores: Tensor, length: Tensor, q: Tensor, scale: float,
                        budget: int, recent: int, padding: Optional[Tensor] = None) -> None:
    """H2O's accumulation and eviction on a ScoredStaticCache layer's buffers and length, in place, after a
    decode step's attention has read them (padding [B, max_len]: the slots holding padding)."""
    heavy_and_recent_(keys, values, scores, length, q, scale, budget, recent, padding)


@heavy_and_recent_op.register_fake
def _heavy_and_recent_fake(keys, values, scores, length, q, scale, budget, recent, padding=None):
    return None


@torch.library.custom_op("tokensparse::kv_evict", mutates_args=())
def kv_evict(keys: Tensor, values: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """The cache reduced to the kept positions kept [B, H_kv, K] (per layer and KV head): new keys and
    values [B, H_kv, K, d]. DynamicCache stores these in place of the grown cache."""
    return evict_positions(keys, values, kept)


@kv_evict.register_fake
def _kv_evict_fake(keys, values, kept):
    batch, heads, count = kept.shape
    return keys.new_empty(batch, heads, count, keys.shape[-1]), values.new_empty(batch, heads, count, values.shape[-1])


def _kept_sequence_positions(mask: Tensor) -> Tensor:
    """The fake [B, S'] int64 positions kept from a [B, S] mask's sequence, S' depending on the data."""
    return mask.new_empty(mask.shape[0], _kept_positions(), dtype=torch.int64)


def _kept_positions():
    """A kept length that depends on the data (image tokens, attention mass): a fresh unbacked size."""
    return torch.library.get_ctx().new_dynamic_size(min=1)


@flop_counter.register_flop_formula(torch.ops.tokensparse.tome_merge)
def _tome_merge_flops(x_shape, size_shape, keys_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, tokens, dim = keys_shape
    half = (tokens + 1) // 2
    return batch * heads * tokens * dim + 2 * batch * half * (tokens // 2) * dim


@flop_counter.register_flop_formula(torch.ops.tokensparse.topk_prune)
def _topk_prune_flops(x_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, tokens, dim = q_shape
    return 2 * batch * heads * tokens * tokens * dim if args[2] == 0 else 2 * batch * heads * tokens * dim


TOME_MERGE = torch.ops.tokensparse.tome_merge.default
TOPK_PRUNE = torch.ops.tokensparse.topk_prune.default
MERGE_MATCHES = torch.ops.tokensparse.merge_matches.default
SELECT_TOP_K = torch.ops.tokensparse.select_top_k.default
SPLIT_TOP_K = torch.ops.tokensparse.split_top_k.default
KEEP_VISION = torch.ops.tokensparse.keep_vision_tokens.default
KEEP_DIVERSE = torch.ops.tokensparse.keep_diverse_vision_tokens.default
KEEP_CHANGED_VIDEO = torch.ops.tokensparse.keep_changed_video_tokens.default
VISIONZIP = torch.ops.tokensparse.visionzip.default
KEEP_IMAGE_ROWS = torch.ops.tokensparse.keep_image_rows.default
FEATURES_AT_SOURCE_ROWS = torch.ops.tokensparse.features_at_source_rows.default
SNAPKV_KEEP = torch.ops.tokensparse.snapkv_keep.default
KV_EVICT = torch.ops.tokensparse.kv_evict.default
KEEP_SINKS_AND_WINDOW = torch.ops.tokensparse.keep_sinks_and_window.default
HEAVY_AND_RECENT = torch.ops.tokensparse.heavy_and_recent.default
ATTENTION_COLUMN_SUMS = torch.ops.tokensparse.attention_column_sums.default
H2O_KEEP = torch.ops.tokensparse.h2o_keep.default
H2O_STEP_KEEP = torch.ops.tokensparse.h2o_step_keep.default
ADAPTIVE_KEEP = torch.ops.tokensparse.adaptive_keep.default
VISION_BUDGET_KEEP = torch.ops.tokensparse.vision_budget_keep.default


def is_tokensparse_target(target) -> bool:
    """A node target that tokensparse inserted: one of its custom ops or one of its helper functions."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "tokensparse"
    return getattr(target, "__module__", "").startswith("tokensparse")


# CUDA implementations from the Triton kernels (tokensparse/runtime/triton_ops.py), opt-in:
# TOKENSPARSE_TRITON_KERNELS=1. They pass their tests on an H100, where the ToMe merge kernel measured slower
# than PyTorch's own ops (docs/deploy.md), so by default the plain PyTorch implementations serve CUDA too.
if os.environ.get("TOKENSPARSE_TRITON_KERNELS") == "1" and torch.cuda.is_available():
    import tokensparse.runtime.triton_ops  # noqa: F401
