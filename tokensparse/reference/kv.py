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

from tokensparse.policies import KVPolicy
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
    if "image_mask" in policy.context_inputs:           # the prompt's positions, alive in every head alike
        context["image_mask"] = None if log.image_mask is None else log.image_mask.gather(1, where[:, 0])
    if "hidden" in policy.context_inputs:
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


# StreamingLLM with positions within the cache (positions="cache"), as the paper computes it (Xiao et al., ICLR 2024,
# Sec. 3.2 and its code's pos-shift attention): each layer keeps its keys before RoPE; every step rotates all of them
# to their places in the cache, 0..L-1, and the step's queries to the last of those places; then it keeps the first
# `sinks` and the last `window` entries. Written from the math, independently of runtime/cache_positions.py: the
# rotations here are complex products in float64 with the frequencies computed from the config, and the model runs
# with every position_id 0, at which its own RoPE is the identity, so that its attention sees unrotated q and k.
STREAMING = "tokensparse_streaming_cache_positions"


class _StreamingState:
    def __init__(self, sinks: int, window: int, frequencies: torch.Tensor):
        self.sinks, self.window, self.frequencies = sinks, window, frequencies
        self.keys: dict[int, torch.Tensor] = {}          # per layer, [B, H_kv, L, d] float64, before RoPE
        self.values: dict[int, torch.Tensor] = {}
        self.longest = 0                                 # the most entries any attention read (positions 0..longest-1)


_streams: list[_StreamingState] = []


def _rope_at(x: torch.Tensor, positions: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d] (float64) rotated to positions [L]: the pairs (x_i, x_{i+d/2}) as complex numbers, times
    exp(1j * position * frequency_i) (the rotate-half layout of Llama's RoPE)."""
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half], x[..., half:])
    turned = pairs * torch.polar(torch.ones_like(frequencies), positions[:, None].double() * frequencies)
    return torch.cat([turned.real, turned.imag], dim=-1)


def _streaming_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over this layer's kept entries and the new ones, all rotated to their cache places (the model's
    q and k arrive unrotated), causal; then the eviction."""
    state = _streams[-1]
    layer = module.layer_idx
    keys, values = key.double(), value.double()
    if layer in state.keys:
        keys, values = torch.cat([state.keys[layer], keys], dim=2), torch.cat([state.values[layer], values], dim=2)
    batch, heads, queries, dim = query.shape
    total = keys.shape[2]
    state.longest = max(state.longest, total)
    places = torch.arange(total, device=key.device)
    q = _rope_at(query.double(), places[total - queries:], state.frequencies)
    k = _rope_at(keys, places, state.frequencies).repeat_interleave(heads // keys.shape[1], dim=1)
    scale = 1.0 / math.sqrt(dim) if scaling is None else scaling
    logits = q @ k.transpose(-1, -2) * scale
    logits = logits.masked_fill(places > places[total - queries:, None], -math.inf)
    output = logits.softmax(dim=-1) @ values.repeat_interleave(heads // keys.shape[1], dim=1)
    if total > state.sinks + state.window:
        kept = torch.cat([places[: state.sinks], places[total - state.window:]])
        keys, values = keys[:, :, kept], values[:, :, kept]
    state.keys[layer], state.values[layer] = keys, values
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def streaming_cache_positions_generate(model, input_ids: torch.Tensor, sinks: int, window: int,
                                       max_new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(sequences [B, S + T], each step's logits [B, V] (float32), the most positions any attention read): greedy
    decoding of an unpadded batch with StreamingLLM at positions within the cache, as above; rows that emit an end
    token continue with the pad token, and decoding stops when every row has ended, as generate() does. For a text
    model with the default (unscaled) rotate-half RoPE."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    config = model.config.get_text_config(decoder=True)
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") != "default":
        raise ValueError(f"this reference rotates with the default RoPE, not {parameters.get('rope_type')!r}")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    frequencies = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=input_ids.device) / dim)
    AttentionInterface.register(STREAMING, _streaming_attention)
    AttentionMaskInterface.register(STREAMING, eager_mask)
    state = _StreamingState(sinks, window, frequencies)
    previous = config._attn_implementation
    _streams.append(state)
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    pad = model.generation_config.pad_token_id
    pad = int(eos[0]) if pad is None and len(eos) else pad
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequences, logits, step = input_ids, [], input_ids
    try:
        config._attn_implementation = STREAMING
        with torch.no_grad():
            for _ in range(max_new_tokens):     # as generate(): a finished row continues with the pad token
                out = model(input_ids=step, position_ids=torch.zeros_like(step), use_cache=False)
                logits.append(out.logits[:, -1].float())
                chosen = logits[-1].argmax(dim=-1)
                chosen = chosen.masked_fill(finished, pad) if pad is not None else chosen
                finished |= torch.isin(chosen, eos)
                step = chosen[:, None]
                sequences = torch.cat([sequences, step], dim=1)
                if bool(finished.all()):
                    break
    finally:
        _streams.pop()
        config._attn_implementation = previous
    return sequences, logits, state.longest
