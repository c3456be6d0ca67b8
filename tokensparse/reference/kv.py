"""Eager reference for the KV-cache policies: generate() with eager attention in which every evicted
position's key column is masked, per layer and KV head, from the step that evicts it on. Evicting a
position and masking it are the same computation; this reference keeps the full cache and chooses with
the policies' plain-PyTorch selection on the attention's own q and k. H2O's scores accumulate per
absolute position from the probabilities this attention computes."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from tokensparse.policies import KVPolicy, VisionBudget
from tokensparse.policies.kv_policy import padded_positions

ORACLE = "tokensparse_kv_oracle"


class EvictionLog:
    """Per layer, the positions alive [B, H_kv, T] after the latest step (absolute cache positions), and the
    attention each position has received so far [B, H_kv, T] (averaged over each KV group's heads)."""

    def __init__(self, policy: KVPolicy, image_mask: Optional[torch.Tensor] = None,
                 padding: Optional[torch.Tensor] = None):
        self.policy = policy
        self.image_mask = image_mask                    # [B, S] bool over the prompt, for vision budgets
        self.padding = padding                          # [B, S] bool over the prompt: a padded batch's padding
        self.alive: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}       # the hidden states each attention read last


_active: list[EvictionLog] = []


def evicting_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scale + mask) v over the full cache, with evicted columns masked; then the step's
    own eviction, applied to the positions still alive."""
    log = _active[-1]
    layer = getattr(module, "layer_idx", None)
    if layer is None:                       # an attention without a cache (a vision tower's): plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, queries, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads
    padding = _padding(log, batch, total, key.device)
    before = log.alive.get(layer)
    alive = torch.ones(batch, kv_heads, total, dtype=torch.bool, device=key.device)
    if before is not None:
        alive[..., : before.shape[-1]] = before
    elif attention_mask is not None:        # a language-model policy's mask: what the last query cannot see is gone
        gone = padded_positions(attention_mask, total) & ~padding
        window = kwargs.get("sliding_window")
        if window:                          # but what its sliding window hides from it may be seen by the others
            gone[:, : max(total - window, 0)] = False
        alive &= ~gone[:, None, :]
    scale = 1.0 / math.sqrt(dim) if scaling is None else scaling
    keys = key.repeat_interleave(group, dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * scale                 # [B, H, q, T]
    if attention_mask is None:              # causal; a model's own mask says what each query sees (an image's
        causal = torch.arange(total, device=key.device) <= torch.arange(total - queries, total,     # tokens or a
                                                                        device=key.device)[:, None]  # prefix both
        logits = logits.masked_fill(~causal, -math.inf)                                             # ways)
    else:
        logits = logits + attention_mask[..., -total:].float() if attention_mask.dtype != torch.bool \
            else logits.masked_fill(~attention_mask[..., -total:], -math.inf)
    logits = logits.masked_fill(~alive.repeat_interleave(group, dim=1)[:, :, None, :], -math.inf)
    probabilities = logits.softmax(dim=-1)
    output = (probabilities @ value.repeat_interleave(group, dim=1).float()).to(query.dtype)
    asking = ~padding[:, total - queries:]                      # padding queries add no attention to the scores
    scores = (probabilities * asking[:, None, :, None]).sum(dim=2).view(batch, kv_heads, group, total).mean(dim=2)
    previous = log.scores.get(layer)
    if previous is not None:
        scores[..., : previous.shape[-1]] += previous
    log.scores[layer] = scores
    log.alive[layer] = _evict(log, layer, query, key, scale, alive, scores, padding)
    if kwargs.get("sliding_window"):        # a sliding-window layer keeps the last window - 1 of what it holds
        log.alive[layer] = _last_alive(log.alive[layer], kwargs["sliding_window"] - 1)
    return output.transpose(1, 2).contiguous(), probabilities


def _padding(log: EvictionLog, batch: int, total: int, device) -> torch.Tensor:
    """[B, total] bool: which cache positions are the prompt's padding (none in an unpadded batch)."""
    padding = torch.zeros(batch, total, dtype=torch.bool, device=device)
    if log.padding is not None:
        padding[:, : log.padding.shape[1]] = log.padding
    return padding


def _evict(log: EvictionLog, layer: int, query, key, scale: float, alive: torch.Tensor,
           scores: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """The positions alive after this step: the policy applied to the alive positions, in order."""
    policy = log.policy
    present = alive[0, 0].sum().item()
    if not bool((alive.sum(dim=-1) == present).all()):
        raise AssertionError("every layer and head holds the same number of positions")
    if not policy.evicts(query.shape[2], present):
        return alive
    where = alive.nonzero()[:, -1].view(*alive.shape[:2], present)                  # [B, H_kv, n] absolute
    stored = key.gather(2, where.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1]))
    context = {}
    if log.padding is not None:                         # the positions alive are in order: padding first, alike
        context["padding"] = padding.gather(1, where[:, 0])
    if isinstance(policy, VisionBudget):                # the prompt's positions, alive in every head alike
        context["image_mask"] = None if log.image_mask is None else log.image_mask.gather(1, where[:, 0])
        hidden = log.hidden[layer]
        context["hidden"] = hidden.gather(1, where[:, 0, :, None].expand(-1, -1, hidden.shape[-1]))
    kept = policy.keep(query, stored, scale, policy.kept_count(present), scores.gather(2, where), **context)
    return torch.zeros_like(alive).scatter(2, where.gather(2, kept), True)


def _last_alive(alive: torch.Tensor, count: int) -> torch.Tensor:
    """alive [B, H_kv, T] bool with only the last `count` alive positions of each row still alive."""
    from_the_end = alive.flip(-1).cumsum(dim=-1).flip(-1)           # alive positions at or after each one
    return alive & (from_the_end <= count)


@contextlib.contextmanager
def evicting(model, policy: KVPolicy, image_mask: Optional[torch.Tensor] = None,
             padding: Optional[torch.Tensor] = None):
    """Run `model` with the evicting reference attention; yields the EvictionLog. `image_mask` [B, S] marks
    the prompt's image tokens (vision budgets), `padding` [B, S] its padding (a padded batch)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ORACLE, evicting_attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)
    configs = [model.config] + [getattr(model.config, name) for name in ("text_config",) if hasattr(model.config, name)]
    previous = [config._attn_implementation for config in configs]
    log = EvictionLog(policy, image_mask, padding)
    _active.append(log)
    hooks = [module.register_forward_pre_hook(_recorder(log, module.layer_idx), with_kwargs=True)
             for module in model.modules() if _is_cached_attention(module)]
    try:
        for config in configs:
            config._attn_implementation = ORACLE
        yield log
    finally:
        for hook in hooks:
            hook.remove()
        _active.pop()
        for config, name in zip(configs, previous):
            config._attn_implementation = name


def _is_cached_attention(module) -> bool:
    return isinstance(getattr(module, "layer_idx", None), int) and type(module).__name__.endswith("Attention")


def _recorder(log: EvictionLog, layer: int):
    def record(module, args, kwargs):
        log.hidden[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return record


def evicted_generate(model, inputs: dict, policy: KVPolicy, **generate_kwargs):
    """(generate()'s output, the EvictionLog): greedy decoding with `policy`'s evictions applied by masking. A model
    with sliding-window layers gets a full DynamicCache unless given a cache: this reference masks by position,
    and transformers' sliding layers would drop entries by their place."""
    from transformers import DynamicCache

    from tokensparse.runtime.sliding_window import sliding_window

    if generate_kwargs.get("past_key_values") is None and sliding_window(model) is not None:
        generate_kwargs["past_key_values"] = DynamicCache()
    image_token = getattr(model.config, "image_token_index", getattr(model.config, "image_token_id", None))
    image_mask = inputs["input_ids"] == image_token if image_token is not None and "pixel_values" in inputs else None
    mask = inputs.get("attention_mask")
    padding = None if mask is None or bool(mask.bool().all()) else ~mask.bool()
    with torch.no_grad(), evicting(model, policy, image_mask, padding) as log:
        return model.generate(**inputs, **generate_kwargs), log
