"""The caches that record the position each held entry came from (sliding windows over an evicted cache)."""

import torch

from tokensparse.runtime.positioned_cache import (PositionedCache, PositionedScoredCache, appended_positions,
                                                  records_positions)


def test_each_layer_records_the_positions_appended_to_it():
    for cache in (PositionedCache(), PositionedScoredCache()):
        for layer, length in ((0, 5), (1, 3), (0, 2)):
            cache.update(torch.randn(2, 2, length, 4), torch.randn(2, 2, length, 4), layer)
        assert records_positions(cache)
        assert cache.layers[0].positions.shape == (2, 2, 7) and cache.layers[0].positions.dtype == torch.int64
        assert cache.layers[0].positions[1, 1].tolist() == list(range(7))
        assert [int(layer.seen) for layer in cache.layers] == [7, 3]
        if isinstance(cache, PositionedScoredCache):        # H2O's scores beside them
            assert cache.layers[0].scores.shape == (2, 2, 7)
        cache.reset()
        assert all(layer.positions is None for layer in cache.layers)
    assert not records_positions(None)


def test_the_positions_follow_the_batch_and_a_crop():
    cache = PositionedCache()
    cache.update(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), 0)
    cache.layers[0].positions = cache.layers[0].positions * torch.tensor([1, 10])[:, None, None]   # tell rows apart
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].positions[0, 0].tolist() == [0, 10, 20, 30, 40]
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].positions.shape == (2, 2, 5)
    cache.crop(-2)
    assert cache.layers[0].positions.shape == (2, 2, 3) and int(cache.layers[0].seen) == 3


def test_appended_positions_count_on_from_the_positions_seen():
    keys = torch.randn(3, 2, 4, 8)
    assert appended_positions(keys, torch.tensor(6)).tolist() == [[[6, 7, 8, 9]] * 2] * 3


def test_scores_and_positions_both_follow_a_beam_reorder():
    cache = PositionedScoredCache()
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), 0)
    layer = cache.layers[0]
    layer.scores = torch.tensor([1.0, 2.0])[:, None, None].expand(2, 2, 3).clone()
    layer.positions = layer.positions * torch.tensor([1, 10])[:, None, None]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert layer.scores[0, 0, 0] == 2.0 and layer.positions[0, 0].tolist() == [0, 10, 20]


def test_a_crop_cuts_scores_and_positions_with_the_keys():
    cache = PositionedScoredCache()
    cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    cache.crop(-2)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == layer.scores.shape[2] == layer.positions.shape[2] == 3 and int(layer.seen) == 3
