"""Eager reference for the KV-cache policies: generate() with eager attention in which every evicted
position's key column is masked, per layer and KV head, from the step that evicts it on. Evicting a
position and masking it are the same computation; this reference keeps the full cache and chooses with
the policies' plain-PyTorch selection on the attention's own q and k. H2O's scores accumulate per
absolute position from the probabilities this attention computes."""

from __future__ import annotations

import contextlib
import math

import torch

from tokensparse.policies import KVPolicy

ORACLE = "tokensparse_kv_oracle"


class EvictionLog:
    """Per layer, the positions alive [B, H_kv, T] after the latest step (absolute cache positions), and the
    attention each position has received so far [B, H_kv, T] (averaged over each KV group's heads)."""

    def __init__(self, policy: KVPolicy):
        self.policy = policy
        self.alive: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}


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
    before = log.alive.get(layer)
    alive = torch.ones(batch, kv_heads, total, dtype=torch.bool, device=key.device)
    if before is not None:
        alive[..., : before.shape[-1]] = before
    elif attention_mask is not None:        # a language-model policy's mask: what the last query cannot see is gone
        last = attention_mask[:, 0, -1, -total:]
        visible = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
        alive &= visible[:, None, :]
    scale = 1.0 / math.sqrt(dim) if scaling is None else scaling
    keys = key.repeat_interleave(group, dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * scale                 # [B, H, q, T]
    causal = torch.arange(total, device=key.device) <= torch.arange(total - queries, total, device=key.device)[:, None]
    logits = logits.masked_fill(~causal, -math.inf)
    if attention_mask is not None:
        logits = logits + attention_mask[..., -total:].float() if attention_mask.dtype != torch.bool \
            else logits.masked_fill(~attention_mask[..., -total:], -math.inf)
    logits = logits.masked_fill(~alive.repeat_interleave(group, dim=1)[:, :, None, :], -math.inf)
    probabilities = logits.softmax(dim=-1)
    output = (probabilities @ value.repeat_interleave(group, dim=1).float()).to(query.dtype)
    scores = probabilities.sum(dim=2).view(batch, kv_heads, group, total).mean(dim=2)
    previous = log.scores.get(layer)
    if previous is not None:
        scores[..., : previous.shape[-1]] += previous
    log.scores[layer] = scores
    log.alive[layer] = _evict(log.policy, query, key, scale, alive, scores)
    return output.transpose(1, 2).contiguous(), probabilities


def _evict(policy: KVPolicy, query, key, scale: float, alive: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The positions alive after this step: the policy applied to the alive positions, in order."""
    present = alive[0, 0].sum().item()
    if not bool((alive.sum(dim=-1) == present).all()):
        raise AssertionError("every layer and head holds the same number of positions")
    if not policy.evicts(query.shape[2], present):
        return alive
    where = alive.nonzero()[:, -1].view(*alive.shape[:2], present)                  # [B, H_kv, n] absolute
    stored = key.gather(2, where.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1]))
    kept = policy.keep(query, stored, scale, policy.kept_count(present), scores.gather(2, where))
    return torch.zeros_like(alive).scatter(2, where.gather(2, kept), True)


@contextlib.contextmanager
def evicting(model, policy: KVPolicy):
    """Run `model` with the evicting reference attention; yields the EvictionLog."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ORACLE, evicting_attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)
    configs = [model.config] + [getattr(model.config, name) for name in ("text_config",) if hasattr(model.config, name)]
    previous = [config._attn_implementation for config in configs]
    log = EvictionLog(policy)
    _active.append(log)
    try:
        for config in configs:
            config._attn_implementation = ORACLE
        yield log
    finally:
        _active.pop()
        for config, name in zip(configs, previous):
            config._attn_implementation = name


def evicted_generate(model, inputs: dict, policy: KVPolicy, **generate_kwargs):
    """(generate()'s output, the EvictionLog): greedy decoding with `policy`'s evictions applied by masking."""
    with torch.no_grad(), evicting(model, policy) as log:
        return model.generate(**inputs, **generate_kwargs), log
