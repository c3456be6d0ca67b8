"""Transitional: names still imported from here by files others are editing (export/, cli/export.py,
runtime/cache_positions.py), now at home in runtime/hf_model.py, model_copy.py, padding_checks.py and cache_kind.py.
Delete once they import them from there."""

from tokensparse.runtime.cache_kind import is_static_cache
from tokensparse.runtime.hf_model import is_generative, tower_splits_graph
from tokensparse.runtime.model_copy import hook_decoder_layers, own_copy
from tokensparse.runtime.padding_checks import check_left_padding

__all__ = ["check_left_padding", "hook_decoder_layers", "is_generative", "is_static_cache", "own_copy",
           "tower_splits_graph"]
