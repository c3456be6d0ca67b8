"""The rewrite passes, one per file, applied in this explicit order. Each is (gm, ctx) -> gm."""

from tokensparse.fx.passes.all_pass_masks import drop_all_pass_masks_pass
from tokensparse.fx.passes.evict_kv import evict_kv_pass
from tokensparse.fx.passes.proportional_attention import proportional_attention_pass
from tokensparse.fx.passes.prune_sequence import prune_sequence_pass
from tokensparse.fx.passes.reduce_tokens import reduce_tokens_pass
from tokensparse.fx.passes.sizes import rederive_sizes_pass
from tokensparse.fx.passes.sliding_positions import sliding_positions_pass
from tokensparse.fx.passes.stale_counts import stale_token_counts_pass
from tokensparse.fx.passes.static_slot_masks import static_slot_masks_pass
from tokensparse.fx.passes.symbolic_first_block import symbolic_first_block_pass
from tokensparse.fx.passes.tower_feature_rows import tower_feature_rows_pass
from tokensparse.fx.passes.verify import verify_cache_pass, verify_pass
from tokensparse.fx.passes.zip_vision_features import zip_vision_features_pass

PASSES = (
    drop_all_pass_masks_pass,     # masks that let every token through would have to follow the cuts
    symbolic_first_block_pass,    # regional compilation: the first block's token count symbolic, as after a cut
    reduce_tokens_pass,           # ToMe, TopK: the policy's token step after each block's attention residual
    tower_feature_rows_pass,      # ToMe, TopK in a VLM's tower: the patch rows its surviving tokens fill
    zip_vision_features_pass,     # VisionZip: dominant and contextual tokens at the vision encoder's feature layer
    prune_sequence_pass,          # FastV, PyramidDrop, DivPrune, exit, VisionZip: prune a VLM's vision tokens
    proportional_attention_pass,  # ToMe: + log(size) on attention logits
    rederive_sizes_pass,          # token-count literals downstream of the cuts
    stale_token_counts_pass,      # refuse a token count used as a number after a cut
    verify_pass,                  # FakeTensor propagation over the result
)

# KV-cache policies rewrite the graph that the passes above produced (or the plain one): the passes that act,
# then, if any did, the checks.
KV_PASSES = (
    evict_kv_pass,                # SnapKV, StreamingLLM, H2O: the stored cache keeps only the kept positions
    sliding_positions_pass,       # sliding-window layers: each query sees the entries within its window by position
)
KV_CHECKS = (
    rederive_sizes_pass,          # FakeTensor propagation (nothing reads the evicted cache in this graph)
    verify_cache_pass,            # outputs changed only along the cache axis
)

# Decode steps into a StaticCache that a language-model policy pruned: no image, no cut, only the masks.
PRUNED_STATIC_DECODE_PASSES = (
    static_slot_masks_pass,       # each attention sees its layer's filled slots, not generate()'s positions
    rederive_sizes_pass,          # FakeTensor propagation over the result
    verify_cache_pass,            # outputs unchanged
)

__all__ = ["KV_CHECKS", "KV_PASSES", "PASSES", "PRUNED_STATIC_DECODE_PASSES"]
