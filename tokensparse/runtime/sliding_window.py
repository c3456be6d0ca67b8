"""Sliding-window layers (Mistral's sliding_window, Qwen2's use_sliding_window, Gemma's local layers) under a KV
policy. An evicted sliding-window layer holds positions the policy chose, not the last ones. transformers masks
it by the places of its entries in the cache, which follow positions only while every position fits the window.
So tokensparse.compile() gives generate() a PositionedCache, whose full layers record their entries' positions,
by which each sliding-window layer's attention sees its window (fx/passes/sliding_positions.py) however long the
generation. A cache without positions (a sliding-window DynamicCache or a StaticCache passed in), and a language-
model policy with the KV policy, stay within the window: a generation or a forward that would pass it is refused."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from tokensparse.runtime.positioned_cache import records_positions


def sliding_window(model) -> Optional[int]:
    """The window of the model's sliding-window attention layers, or None for a model without them."""
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _text_config(model):
    """The config of the model's language model: a VLM's text config, else the model's own."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def refuse_chunked_attention(model, policy_name: str) -> None:
    """A KV policy on a model with chunked-attention layers (Llama4's attention_chunk_size): each such layer
    attends within fixed chunks of positions, which its cache keeps apart from eviction; refused by name."""
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None) or ()
    chunked = [index for index, kind in enumerate(layer_types) if kind == "chunked_attention"]
    if chunked:
        raise ValueError(f"kv={policy_name}: decoder layers {chunked} use chunked attention (attention_chunk_size="
                         f"{getattr(config, 'attention_chunk_size', None)}, as in Llama4), whose queries attend within "
                         f"fixed chunks of positions; KV-cache eviction does not support chunked layers. Use the "
                         f"language-model policies alone (llm=), or a model without chunked attention")


def layer_windows(model, window: int) -> tuple[int, ...]:
    """Each decoder layer's sliding window, 0 for a full-attention layer (layer_types, else every layer slides)."""
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window,) * config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)


def window_limit(window: int, cache) -> int:
    """The positions a generation may reach: the window, or a StaticCache's sliding-window buffer if shorter
    (StaticSlidingWindowLayer rolls its buffer once its positions fill it, which evicted slots do not follow)."""
    buffers = [layer.max_cache_len for layer in getattr(cache, "layers", ()) if getattr(layer, "is_sliding", False)
               and isinstance(getattr(layer, "max_cache_len", None), int)]
    return min([window] + buffers)


def _refusal(policy_name: str, window: int, positions: int, what: str) -> ValueError:
    return ValueError(f"kv={policy_name}: the model's sliding-window layers hold at most the last {window} positions, "
                      f"and {what} needs {positions}. Evicting from sliding-window layers past the window needs a "
                      f"cache that records positions (tokensparse.PositionedCache, which generate() gets when given "
                      f"no past_key_values) and no language-model policy; otherwise generate at most {window} "
                      f"positions in all (prompt + max_new_tokens - 1)")


def check_forward_within_window(window: int, policy_name: str, kwargs: dict) -> None:
    """Refuse a forward whose last position is past the window. Positions seen: the sliding-window layers' own
    count (they count positions, not the entries they hold), else the width of the 2-D attention mask (this
    forward's positions included) or cache_position."""
    cache, mask, cache_position = (kwargs.get(name) for name in ("past_key_values", "attention_mask",
                                                                   "cache_position"))
    window = window_limit(window, cache)
    embedded = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    counts = [_positions_seen(layer) for layer in getattr(cache, "layers", ())]
    counts = [count for count in counts if count is not None]
    if counts and embedded is not None:
        positions = max(counts) + embedded.shape[1]
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        positions = mask.shape[-1]
    elif isinstance(cache_position, torch.Tensor) and cache_position.numel():
        positions = int(cache_position.max()) + 1
    else:
        return                      # nothing tells the positions: the graph's own masks bound them
    if positions > window:
        raise _refusal(policy_name, window, positions, "this forward")


def _positions_seen(layer) -> Optional[int]:
    """The positions a sliding-window cache layer has seen (Dynamic- and StaticSlidingWindowLayer count them in
    Python), or None for another layer."""
    if not getattr(layer, "is_sliding", False):
        return None
    count = getattr(layer, "cumulative_length_int", getattr(layer, "cumulative_length", None))
    return count if isinstance(count, int) else None


def refuse_generation_past_window(fast, window: int, policy_name: str, positioned: bool) -> None:
    """Make fast.generate() refuse, before it starts, a generation whose prompt and new tokens pass the window;
    `positioned`: generate() makes a PositionedCache when given none, and a cache that records positions may."""
    generate = fast.generate

    @functools.wraps(generate)
    def generate_within_window(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        if positioned and (cache is None or records_positions(cache)):
            return generate(*args, **kwargs)
        embedded = kwargs.get("input_ids", args[0] if args else None)
        if embedded is None:
            embedded = kwargs.get("inputs_embeds")
        settings = kwargs.get("generation_config") or fast.generation_config
        new_tokens = kwargs.get("max_new_tokens", settings.max_new_tokens)
        limit = window_limit(window, kwargs.get("past_key_values"))
        if embedded is not None:
            total = embedded.shape[1] + new_tokens if new_tokens is not None else kwargs.get("max_length",
                                                                                            settings.max_length)
            if total - 1 > limit:
                raise _refusal(policy_name, limit, total - 1, "this generation")
        return generate(*args, **kwargs)

    fast.generate = generate_within_window
