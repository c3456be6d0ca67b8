"""Which transformers cache a forward is handed: a StaticCache, an empty one."""

from __future__ import annotations


def is_static_cache(cache) -> bool:
    """A transformers StaticCache (fixed buffers written at a per-layer cumulative_length)."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    return any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ()))


def cache_is_empty(cache) -> bool:
    """No position written yet: the forward is a prefill."""
    return int(cache.get_seq_length()) == 0
