"""The caches that count the positions entering each layer (a language-model policy with a KV policy on a
padded batch reads a layer's padding count from them)."""

import torch

from tests.models import build_llama
from tokensparse.runtime.counted_cache import CountedCache, CountedScoredCache, CountedStaticCache


def test_each_layer_counts_the_positions_appended_to_it():
    for cache in (CountedCache(), CountedScoredCache()):
        for layer, length in ((0, 5), (1, 3), (0, 1)):
            cache.update(torch.randn(2, 2, length, 4), torch.randn(2, 2, length, 4), layer)
        assert [int(layer.entered) for layer in cache.layers] == [6, 3]
        assert cache.counts_entries
        if isinstance(cache, CountedScoredCache):          # H2O's scores, one per cached position, beside the count
            assert cache.layers[0].scores.shape == (2, 2, 6)
        cache.reset()
        assert all(layer.entered is None for layer in cache.layers)


def test_each_static_layer_counts_the_positions_written_to_it():
    model, _ = build_llama(layers=2, prompt=8)
    for scores in (False, True):
        cache = CountedStaticCache(model.config, max_cache_len=16, scores=scores)
        kv_heads, dim = model.config.num_key_value_heads, model.config.head_dim
        for layer, length in ((0, 5), (1, 3), (0, 1)):
            cache.update(torch.randn(2, kv_heads, length, dim), torch.randn(2, kv_heads, length, dim), layer)
        assert [int(layer.entered) for layer in cache.layers] == [6, 3]
        assert hasattr(cache.layers[0], "scores") == scores
        cache.reset()
        assert [int(layer.entered) for layer in cache.layers] == [0, 0]
