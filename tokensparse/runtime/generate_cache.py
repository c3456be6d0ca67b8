"""The cache a compiled model's generate() starts from when given none: the DynamicCache its policies need."""

from __future__ import annotations

import functools


def own_cache_class(config, prunes_sequence: bool, positioned: bool):
    """The DynamicCache generate() needs: H2O's per-position scores (ScoredCache), with a language-model policy
    the count of positions that entered each layer (CountedCache; see decode_masks._mask_held_padding), and on a
    model with sliding-window layers the positions of each layer's entries (PositionedCache)."""
    from tokensparse.runtime.counted_cache import CountedCache, CountedScoredCache
    from tokensparse.runtime.positioned_cache import PositionedCache, PositionedScoredCache
    from tokensparse.runtime.scored_cache import ScoredCache

    if positioned:
        return PositionedScoredCache if config.kv.scored else PositionedCache
    if prunes_sequence:
        return CountedScoredCache if config.kv.scored else CountedCache
    return ScoredCache


def generate_with_own_cache(fast, generate, cache_class) -> None:
    """Make fast.generate() start from a `cache_class` unless given a cache."""

    @functools.wraps(generate)
    def generate_with_own_cache(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache_class(fast.config)
        return generate(fast, *args, **kwargs)

    fast.generate = generate_with_own_cache
