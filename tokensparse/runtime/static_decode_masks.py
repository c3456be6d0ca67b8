"""The masks of decode steps into a StaticCache, whose slots stop following positions once a policy prunes or
evicts."""

from __future__ import annotations

import torch

from tokensparse.config import sequence_option, sequence_policy
from tokensparse.runtime.cache_kind import cache_is_empty, is_static_cache
from tokensparse.runtime.decode_masks import is_2d, position_mask
from tokensparse.runtime.padding_checks import check_left_padding


class StaticDecodeMasks:
    """The masks of decode steps into a StaticCache. Its slots stop following positions once a policy prunes or
    evicts, so every decode graph's attention gets a mask over its own layer's slots (fx/passes/static_slot_masks.py).
    For a padded batch that mask also needs the padding, which generate()'s own 4-D mask, built over layer 0's
    slots as if they were positions, no longer tells. So a padded batch's decode step gets the causal mask over
    positions instead, as wide as the buffer: positions 0..max_len-1, or, once the positions seen outnumber the
    slots (StreamingLLM and H2O keep a small buffer), the last max_len of them. That still counts the real
    positions an evicted layer may hold; the padding a pruned layer holds is read from where the real positions
    start, so a language-model policy on a padded batch needs a buffer as long as the sequence (a ValueError
    says so). An unpadded batch's decode step gets None: the graph builds the plain causal mask, which the
    passes replace."""

    def __init__(self, fast, config, create_masks):
        self.fast, self.config, self.create_masks, self.last = fast, config, create_masks, None

    def create_masks_for_generate(self, *args, **kwargs):
        """generate()'s hook for the 4-D masks of a compileable cache."""
        cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
        if not is_static_cache(cache) or cache_is_empty(cache) or not (mask is None or is_2d(mask)):
            return self.create_masks(*args, **kwargs)
        self.last = None if mask is None else self._over_positions(mask, kwargs["inputs_embeds"].shape[1], cache)
        return self.last

    def decode_mask(self, kwargs):
        """The forward's mask: a decode step's 2-D mask becomes the mask above; a 4-D one must be the one
        generate() got from create_masks_for_generate."""
        mask, cache = kwargs.get("attention_mask"), kwargs["past_key_values"]
        if cache_is_empty(cache) or mask is None or mask is self.last:
            return mask
        if is_2d(mask):
            embedded = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            return self._over_positions(mask, embedded.shape[1], cache)
        raise ValueError("a decode step into a StaticCache got a 4-D attention_mask that tokensparse did not build: "
                         "pass the 2-D attention_mask (generate() does), from which each layer's mask over its "
                         "own slots is built")

    def _over_positions(self, mask: torch.Tensor, queries: int, cache):
        if bool(mask.bool().all()):
            return None
        check_left_padding(mask)
        seen, width = mask.shape[-1], cache.layers[0].max_cache_len
        if seen <= width:
            return position_mask(self.fast, torch.nn.functional.pad(mask, (0, width - seen)), queries, seen - queries)
        if sequence_policy(self.config) is not None:
            raise ValueError(f"{sequence_option(self.config)} on a padded batch into a StaticCache needs "
                             f"max_cache_len >= the positions seen ({seen}), not {width}")
        return position_mask(self.fast, mask[:, seen - width:], queries, width - queries)


def hand_static_decode_masks(fast, config) -> StaticDecodeMasks:
    """Make generate() build fast's StaticCache decode masks with StaticDecodeMasks."""
    from transformers.masking_utils import create_masks_for_generate

    handed = StaticDecodeMasks(fast, config, getattr(fast, "create_masks_for_generate", create_masks_for_generate))
    fast.create_masks_for_generate = handed.create_masks_for_generate
    return handed
