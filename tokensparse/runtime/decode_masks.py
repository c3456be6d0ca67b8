"""Decode steps' attention masks cut to each decoder layer's own cache, which a policy pruned or evicted."""

from __future__ import annotations

import functools

import torch

from tokensparse.config import CallerFacts, sequence_option, sequence_policy
from tokensparse.runtime.cache_kind import is_static_cache
from tokensparse.runtime.model_copy import hook_decoder_layers
from tokensparse.runtime.padding_checks import check_left_padding


def cut_masks_per_layer(fast, prunes_sequence: bool, evicts: bool) -> CallerFacts:
    """Hook `fast`'s decoder layers to cut each decode step's mask to the layer's own cache, and say which masks
    follow the cache from then on: for a language-model policy (`prunes_sequence`), a KV policy (`evicts`) or both.
    No facts for a model whose decoder layers are not found (padded prompts then stay refused)."""
    if prunes_sequence and evicts and hook_decoder_layers(fast, _mask_held_padding):
        return CallerFacts(decode_masks_follow_cache=True, kv_masks_follow_cache=True)
    if prunes_sequence and _cut_decode_masks(fast, _first_columns):
        return CallerFacts(decode_masks_follow_cache=True)
    if evicts and _cut_decode_masks(fast, _last_columns):
        return CallerFacts(kv_masks_follow_cache=True)
    return CallerFacts()


def _cut_decode_masks(fast, cut) -> bool:
    """Give `fast` its own copies of the modules down to its decoder layers, each layer with a forward
    pre-hook that cuts a decode step's 4-D padding mask to that layer's cache length (`cut`: which columns).
    Returns False for a model whose decoder layers are not found.

    Language-model pruning (_first_columns): generate() builds the mask once, as long as layer 0's cache; a
    pruned layer holds fewer positions. Its cache is the kept prompt positions in order, then the generated
    ones. Left padding puts every padding position first, and no policy drops a padding position (they are
    text). So the first columns of the mask are that layer's mask.

    KV eviction (_last_columns): the forward hands decode steps a mask over every position seen
    (evicted_cache_mask). The policies rank padding below every real position and keep positions in order,
    so an evicted cache holds padding only when it holds every real position seen, and then as many padding
    positions as it has slots left, first. So the last columns of the mask are that layer's mask."""
    return hook_decoder_layers(fast, functools.partial(_cut_mask_to_cache, cut))


def _cut_mask_to_cache(cut, index: int, module, args, kwargs):
    mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or cache is None or is_static_cache(cache):
        return None                     # a StaticCache's mask spans its buffers' slots (fx/passes/evict_kv.py)
    hidden = args[0] if args else kwargs["hidden_states"]
    keys = _held(cache, index) + hidden.shape[1]
    if mask.shape[-1] <= keys:
        return None
    return args, {**kwargs, "attention_mask": cut(mask, keys)}


def _held(cache, index: int) -> int:
    """How many positions layer `index` of a DynamicCache holds: its keys' length (a sliding-window layer's
    get_seq_length counts every position seen instead)."""
    keys = getattr(cache.layers[index], "keys", None) if index < len(cache.layers) else None
    return keys.shape[-2] if isinstance(keys, torch.Tensor) else cache.get_seq_length(index)


def _mask_held_padding(index: int, module, args, kwargs):
    """Pre-hook of decoder layer `index` under a language-model policy and a KV policy: a decode step's mask for
    the layer's own cache, from the mask over every position seen (evicted_cache_mask). The layer holds its kept
    positions in order, padding first. Pruning drops no padding; eviction drops padding first (the KV policies
    rank it below every real position). So the layer holds max(0, padding - evicted) padding positions, where
    `evicted` = the positions that entered it (CountedCache counts them) - those it holds."""
    mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or cache is None or is_static_cache(cache):
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    queries, held = hidden.shape[1], _held(cache, index)
    if mask.shape[-1] <= held + queries:
        return None                     # a prefill, or a layer that holds every position seen
    entered = getattr(cache.layers[index], "entered", None)
    if entered is None:                 # a cache that does not count (unpadded: evicted_cache_mask checked)
        return args, {**kwargs, "attention_mask": _last_columns(mask, held + queries)}
    from tokensparse.policies.fastv import additive, attended
    from tokensparse.runtime.counted_cache import held_padding

    padding = attended(mask[:, 0, -1]).int().argmax(dim=-1)     # left padding: where the real positions start
    first_real = held_padding(padding, entered, held)
    columns = torch.arange(held + queries, device=mask.device)
    causal = columns[None, :] <= held + torch.arange(queries, device=mask.device)[:, None]
    layer_allowed = causal[None, None] & (columns[None, :] >= first_real[:, None])[:, None, None, :]
    return args, {**kwargs, "attention_mask": layer_allowed if mask.dtype == torch.bool
                  else additive(layer_allowed, mask.dtype)}


def _first_columns(mask: torch.Tensor, keys) -> torch.Tensor:
    return mask[..., :keys]


def _last_columns(mask: torch.Tensor, keys) -> torch.Tensor:
    return mask[..., mask.shape[-1] - keys:]


def is_2d(mask) -> bool:
    """A [B, S] padding mask (generate()'s), not a 4-D attention mask."""
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


def evicted_cache_mask(fast, config, layers_cut_masks: bool, kwargs):
    """The attention mask for a forward with a KV policy: the 2-D mask for the prefill (transformers builds
    its 4-D mask over the whole prompt), and for a decode step the 4-D mask over every position seen, which
    each decoder layer cuts to its evicted cache (transformers would size it by layer 0's cache and read its
    first columns: wrong for a padded batch, and too narrow for a layer that keeps more than layer 0).
    Refuses the padded batches it cannot mask correctly."""
    mask, cache = kwargs["attention_mask"], kwargs.get("past_key_values")
    if not bool(mask.bool().all()):
        if not layers_cut_masks:
            raise ValueError(f"kv={config.kv.name} on a padded batch needs the model's decoder layers "
                             f"(get_decoder().layers), which this model does not expose: batch prompts of one length")
        if sequence_policy(config) is not None and not getattr(cache, "counts_entries", False):
            raise ValueError(f"{sequence_option(config)} and kv={config.kv.name} together on a padded batch need "
                             f"the cache to count the positions that entered each layer: let generate() make it (pass "
                             f"no past_key_values), or pass tokensparse.CountedCache()")
        check_left_padding(mask)
    if not layers_cut_masks or cache is None or cache.get_seq_length() == 0:
        return mask
    embedded = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    queries = embedded.shape[1]
    return position_mask(fast, mask, queries, mask.shape[-1] - queries)


def position_mask(fast, mask: torch.Tensor, queries: int, first_query: int):
    """The 4-D causal mask (bool for SDPA, additive for eager attention) over the columns of the 2-D padding mask
    [B, W], for `queries` queries at columns first_query, first_query + 1, ..."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    decoder_config = fast.get_decoder().config
    implementation = decoder_config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"masking a padded batch's decode steps needs attn_implementation 'sdpa' or 'eager', not "
                         f"{implementation!r}")
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=mask.shape[0], q_length=queries, kv_length=mask.shape[-1], q_offset=first_query, kv_offset=0,
        mask_function=causal_mask_function, attention_mask=mask.bool(), allow_is_causal_skip=False,
        dtype=fast.dtype, config=decoder_config, device=mask.device)
