"""Which padded batches a compiled forward can mask: left padding, and what a StaticCache needs; the rest refused by
name."""

from __future__ import annotations

import torch

from tokensparse.config import sequence_option, sequence_policy
from tokensparse.runtime.cache_kind import cache_is_empty


def check_left_padding(attention_mask) -> None:
    """Pruning a padded batch needs the padding on the left (each row 0...0 1...1), as generate() expects."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    rows = attention_mask.bool()
    wrong = (rows[:, :-1] & ~rows[:, 1:]).any(dim=1)
    if bool(wrong.any()):
        raise ValueError(f"attention_mask pads samples {wrong.nonzero()[:, 0].tolist()} on the right (or in the "
                         f"middle): pruning a padded batch needs left padding (tokenizer.padding_side = 'left')")


def check_static_cache(config, attention_mask, cache) -> None:
    """What works with a StaticCache: KV policies, language-model policies (llm=, vision= in a VLM's tower) and
    both together, also on left-padded batches; both on a padded batch need a CountedStaticCache."""
    if (sequence_policy(config) is None or config.kv is None or getattr(cache, "counts_entries", False)
            or not _pads(attention_mask, cache)):
        _check_left_padded_prefill(attention_mask, cache)
        return
    raise ValueError(f"{sequence_option(config)} and kv={config.kv.name} together on a padded batch need the "
                     f"StaticCache to count the positions that entered each layer: pass past_key_values="
                     f"tokensparse.CountedStaticCache(model.config, max_cache_len"
                     f"{', scores=True' if config.kv.scored else ''})")


def _check_left_padded_prefill(attention_mask, cache) -> None:
    """A prefill into an empty StaticCache: its mask (2-D, or generate()'s 4-D one over the buffer's slots) must
    pad on the left."""
    if not isinstance(attention_mask, torch.Tensor) or not cache_is_empty(cache):
        return
    from tokensparse.policies.fastv import attended

    if attention_mask.dim() == 4:
        attention_mask = attended(attention_mask[:, 0, -1, : attention_mask.shape[-2]])
    check_left_padding(attention_mask)


def _pads(attention_mask, cache) -> bool:
    """Whether a prefill's mask hides some of the prompt: a 2-D mask with zeros, or generate()'s 4-D mask for
    an empty StaticCache that is not plainly causal over the buffer's slots."""
    if not isinstance(attention_mask, torch.Tensor):
        return False
    if attention_mask.dim() == 2:
        return not bool(attention_mask.bool().all())
    first = cache.layers[0]
    if attention_mask.dim() != 4 or (getattr(first, "is_initialized", False) and int(first.cumulative_length)):
        return False                     # a decode step: its prefill was checked
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    queries, slots = allowed.shape[-2:]
    causal = torch.arange(slots, device=allowed.device)[None, :] <= torch.arange(queries, device=allowed.device)[:, None]
    return not bool((allowed == causal).all())
