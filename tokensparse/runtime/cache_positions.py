"""StreamingLLM(positions="cache") (Xiao et al., ICLR 2024, Sec. 3.2): positions within the cache, not in the text.
The cache holds its keys before RoPE. Each forward's attention reads them rotated to their slots 0..L-1 (the held
ones rotated here, the new ones as the model rotated them), and the forward's new tokens take the slots after the
held ones: tokensparse.compile()'s forward hands the model position_ids = held + 0..S-1 (a decode step's query sits
at the cache's length). So no position exceeds sinks + window, however long generation runs: past the model's
max_position_embeddings. The cache stores each new key rotated back from its slot (once, on entry), so the stored
keys never accumulate rounding from step to step; fx/passes/evict_kv.py splices both functions into the graph."""

from __future__ import annotations

import dataclasses
import sys

import torch

FORM = "rotate-half RoPE (Llama, Qwen2, ...)"


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: tuple) -> torch.Tensor:
    """x [..., L, d] rotated by RoPE to positions [L] (int64; negative rotates back), in the rotate-half form:
    dims i and i + r/2 turn by position * inv_freq[i], for r = 2 * len(inv_freq) (the first r dims; the others,
    a partial rotary's, stay). Without the rotary embedding's attention scaling (a rotation by a difference)."""
    frequencies = torch.tensor(inv_freq, dtype=torch.float32, device=x.device)
    angles = positions.to(torch.float32)[:, None] * frequencies
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    width = 2 * len(inv_freq)
    turned = x[..., :width].to(torch.float32)
    half = turned.shape[-1] // 2
    rotated = turned * cos + torch.cat([-turned[..., half:], turned[..., :half]], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), x[..., width:]], dim=-1)


def keys_at_cache_slots(held: torch.Tensor, new: torch.Tensor, inv_freq: tuple) -> torch.Tensor:
    """The keys an attention reads [B, H_kv, n + S, d]: the held ones (stored before RoPE) rotated to their slots
    0..n-1, then the new ones (rotated by the model at slots n..n+S-1)."""
    if held.dim() != new.dim():         # an empty cache (a DynamicLayer starts from a 1-D empty tensor)
        return new
    slots = torch.arange(held.shape[2], device=held.device)
    return torch.cat([rotate(held, slots, inv_freq), new], dim=2)


def keys_before_rope(held: torch.Tensor, new: torch.Tensor, inv_freq: tuple) -> torch.Tensor:
    """What the cache stores [B, H_kv, n + S, d]: the held keys as they are (before RoPE), then the new ones rotated
    back from their slots n..n+S-1."""
    count = held.shape[2] if held.dim() == new.dim() else 0
    slots = torch.arange(count, count + new.shape[2], device=new.device)
    return torch.cat([held, rotate(new, -slots, inv_freq)], dim=-2)


def at_cache_positions(policy, args: tuple, kwargs: dict) -> dict:
    """A forward's keywords with its new tokens at the cache's next slots: position_ids = held + 0..S-1, where held
    is the number of entries the cache holds (every layer holds as many under StreamingLLM alone). Refuses what
    positions="cache" does not cover, naming it."""
    from tokensparse.runtime.cache_kind import is_static_cache

    option = f"kv={policy.name}(positions='cache')"
    if args:
        raise ValueError(f"{option}: pass the forward's inputs as keywords (input_ids=..., past_key_values=...), whose "
                         f"positions it assigns")
    cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
    if is_static_cache(cache):
        raise ValueError(f"{option} with a StaticCache is not supported: its keys are stored rotated at their slots; "
                         f"use a DynamicCache (generate()'s default)")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
        raise ValueError(f"{option} on a padded batch is not supported (each sample's cache positions would differ "
                         f"by its padding): batch prompts of one length, or use positions='original'")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise ValueError(f"{option} takes the 2-D attention_mask (generate() passes it), not a {mask.dim()}-D one")
    embedded = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if embedded is None:
        raise ValueError(f"{option} needs input_ids or inputs_embeds")
    held = 0 if cache is None else int(cache.get_seq_length())
    batch, queries = embedded.shape[:2]
    slots = torch.arange(held, held + queries, device=embedded.device)
    kwargs = dict(kwargs, position_ids=slots.expand(batch, queries))
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = slots
    return kwargs


def cache_positions_config(model, config, prunes_sequence: bool, window):
    """(config, whether its forward assigns cache positions): for StreamingLLM(positions="cache"), the config whose
    policy carries the model's RoPE frequencies; ValueError for what it does not cover, naming it."""
    policy = config.kv
    if policy is None or not policy.at_cache_positions:
        return config, False
    option = f"kv={policy.name}(positions='cache')"
    if prunes_sequence:
        raise ValueError(f"{option} together with llm= or vision= is not supported: a pruned layer holds fewer "
                         f"entries than layer 0, so its cache positions would differ by layer; use positions="
                         f"'original'")
    if window is not None:
        raise ValueError(f"{option} on a model with sliding-window layers ({type(model).__name__}) is not supported: "
                         f"use positions='original'")
    rope = rope_frequencies(model, option)
    return dataclasses.replace(config, kv=dataclasses.replace(policy, rope=rope)), True


def rope_frequencies(model, option: str = "positions='cache'") -> tuple:
    """The inverse frequencies of `model`'s decoder's rotary embedding, checked to rotate as rotate() does (the
    model's own apply_rotary_pos_emb, at a few positions); ValueError for a model without RoPE or with another form."""
    name = type(model).__name__
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        rotary = next((module for module in decoder.modules() if isinstance(getattr(module, "inv_freq", None),
                                                                           torch.Tensor)), None)
    if rotary is None:
        raise ValueError(f"{option} rotates keys with the model's rotary embedding (RoPE), and {name} has none "
                         f"(its positions are not rotary): use positions='original'")
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or rope_type == "longrope":
        raise ValueError(f"{option}: {name}'s RoPE ({rope_type!r}) changes its frequencies with the sequence length, "
                         f"which positions='cache' does not follow: use positions='original'")
    if getattr(rotary, "mrope_section", None) is not None or getattr(getattr(model, "config", None), "mrope_section",
                                                                     None) is not None:
        raise ValueError(f"{option}: {name} numbers positions in 3-D (M-RoPE), which positions='cache' does not "
                         f"cover: use positions='original'")
    inv_freq = tuple(rotary.inv_freq.float().tolist())
    _check_form(decoder, rotary, inv_freq, name, option)
    return inv_freq


def _check_form(decoder, rotary, inv_freq: tuple, name: str, option: str) -> None:
    """The model's own apply_rotary_pos_emb equals rotate() (times the embedding's attention scaling)."""
    attention = next((module for module in decoder.modules() if isinstance(getattr(module, "head_dim", None), int)
                      and isinstance(getattr(module, "layer_idx", None), int)), None)
    apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None) if attention else None
    if apply is None:
        raise ValueError(f"{option}: {name}'s attention applies no apply_rotary_pos_emb that tokensparse can check "
                         f"against the {FORM} it rotates keys with: use positions='original'")
    device = rotary.inv_freq.device
    x = torch.randn(1, 1, 5, attention.head_dim, generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.tensor([[0, 1, 7, 30, 100]], device=device)
    try:
        with torch.no_grad():
            cos, sin = rotary(x, positions)
            _, want = apply(x, x, cos.float(), sin.float())
    except Exception as error:  # noqa: BLE001 (an unexpected form: named, not a traceback from inside the model)
        raise ValueError(f"{option}: {name}'s rotary embedding is not the {FORM} that it rotates keys with "
                         f"({type(error).__name__}: {error}): use positions='original'") from error
    got = rotate(x, positions[0], inv_freq) * float(getattr(rotary, "attention_scaling", 1.0))
    if want.shape != got.shape or not torch.allclose(want.float(), got, rtol=1e-4, atol=1e-4):
        raise ValueError(f"{option}: {name}'s rotary embedding is not the {FORM} that it rotates keys with: use "
                         f"positions='original'")
