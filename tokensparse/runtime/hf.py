"""Hugging Face helpers: compile a generative model's forward with the tokensparse backend so that
model.generate() runs pruned prefill (the vision tower runs inside forward) and decodes from the pruned
KV cache. torch.compile(model).generate() would compile nothing: generate() calls the model's own forward."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import torch


def is_generative(model) -> bool:
    """A transformers model with generate()."""
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    return isinstance(model, GenerationMixin)


def install_output_hooks(model) -> None:
    """Install transformers' output-capturing hooks now; installed lazily by the first forward, they
    would break the first compiled graph about a dozen times."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks
    except ImportError:
        return
    for module in model.modules():
        if _CAN_RECORD_REGISTRY.get(module):
            maybe_install_capturing_hooks(module)


# Forward arguments that carry an image: raw pixels, or the features generate() encodes before prefill.
_IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "image_features")


def compile_for_generate(model, config, **torch_compile_kwargs):
    """A shallow copy of `model` (same weights) whose forward is compiled with the tokensparse backend and
    `config`; the model passed in is not changed."""
    from tokensparse.backend import tokensparse_backend
    from tokensparse.capture import ISOLATED_RECOMPILES
    from tokensparse.runtime.cache_positions import at_cache_positions, cache_positions_config
    from tokensparse.runtime.positioned_cache import records_positions
    from tokensparse.scalar_outputs import ScalarOutputs
    from tokensparse.warn import warnings_per_call
    from tokensparse.runtime.sliding_window import (check_forward_within_window, layer_windows,
                                                    refuse_chunked_attention, refuse_generation_past_window,
                                                    sliding_window)

    if config.kv is not None:
        refuse_chunked_attention(model, config.kv.name)
    install_output_hooks(model)
    fast = own_copy(model)
    if getattr(model, "generation_config", None) is not None:
        # forward is compiled already: generate() must not wrap it in a second torch.compile (it does so by
        # default on GPUs with a StaticCache), which would trace through it without the tokensparse backend
        fast.generation_config = copy.deepcopy(model.generation_config)
        fast.generation_config.disable_compile = True
    prunes_sequence = _sequence_policy(config) is not None
    if prunes_sequence and config.kv is not None and hook_decoder_layers(fast, _mask_held_padding):
        config = dataclasses.replace(config, decode_masks_follow_cache=True, kv_masks_follow_cache=True)
    elif prunes_sequence and _cut_decode_masks(fast, _first_columns):
        config = dataclasses.replace(config, decode_masks_follow_cache=True)
    elif config.kv is not None and _cut_decode_masks(fast, _last_columns):
        config = dataclasses.replace(config, kv_masks_follow_cache=True)
    evicted_masks = config.kv_masks_follow_cache
    handed = _hand_static_decode_masks(fast, config)
    window = sliding_window(model) if config.kv is not None else None
    config, cache_positions = cache_positions_config(model, config, prunes_sequence, window)   # StreamingLLM's
    positioned = window is not None and not prunes_sequence      # sliding windows over recorded positions
    if positioned:
        config = dataclasses.replace(config, sliding_windows=layer_windows(model, window))
    backend = functools.partial(tokensparse_backend, options=config)
    scalar_outputs = ScalarOutputs()
    # Each compiled copy counts its own recompiles: another copy of the same model class (another config, the
    # unmodified model) must not use up dynamo's limit of 8 per code object and leave this one running eagerly.
    compiled = torch.compile(type(model).forward.__get__(fast), backend=backend,
                             **{**ISOLATED_RECOMPILES, **torch_compile_kwargs})

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        if cache_positions:         # the new tokens at the cache's next slots
            kwargs = at_cache_positions(config.kv, args, kwargs)
        if prunes_sequence and any(kwargs.get(name) is not None for name in _IMAGE_INPUTS):
            check_left_padding(kwargs.get("attention_mask"))
        if window is not None and not (positioned and records_positions(kwargs.get("past_key_values"))):
            check_forward_within_window(window, config.kv.name, kwargs)
        if is_static_cache(kwargs.get("past_key_values")):
            check_static_cache(config, kwargs.get("attention_mask"), kwargs["past_key_values"])
            kwargs["attention_mask"] = handed.decode_mask(kwargs)
        elif config.kv is not None and _is_2d(kwargs.get("attention_mask")):
            kwargs["attention_mask"] = evicted_cache_mask(fast, config, evicted_masks, kwargs)
        # The warnings are about the graphs that matter: a graph break's fragments are quiet when the prefill was
        # rewritten. capture_scalar_outputs only while this model's code traces with it (scalar_outputs.py).
        with warnings_per_call(model):
            return scalar_outputs(compiled, *args, **kwargs)

    if not tower_splits_graph(model):
        _encode_images_in_forward(forward)
    fast.forward = forward
    if config.kv is not None and (config.kv.scored or config.kv_masks_follow_cache and prunes_sequence or positioned):
        _generate_with_own_cache(fast, type(model).generate, _own_cache_class(config, prunes_sequence, positioned))
    if window is not None:
        refuse_generation_past_window(fast, window, config.kv.name, positioned)
    return fast


def _encode_images_in_forward(forward) -> None:
    """Hide `mm_encoder_outputs` from the compiled forward's signature. generate() then hands the prefill the
    pixels instead of running the vision tower eagerly before it: the tower is compiled with the prefill, and
    a policy that acts inside it (VisionZip) finds it there."""
    signature = inspect.signature(forward)
    forward.__signature__ = signature.replace(parameters=[
        parameter for name, parameter in signature.parameters.items() if name != "mm_encoder_outputs"])


def tower_splits_graph(model) -> bool:
    """Whether the model's vision path reads image sizes in Python and splits into many graphs: a grid of
    variable resolution (`image_grid_thw`: Qwen2-VL, Qwen2.5-VL, read with .tolist()) or anyres tiling
    (`image_grid_pinpoints`: LLaVA-NeXT, LLaVA-OneVision, which pick a tiling per image size). generate()
    runs such towers eagerly before the prefill, whose graph then holds the feature merge and the whole
    language model."""
    return ("image_grid_thw" in inspect.signature(model.forward).parameters
            or getattr(model.config, "image_grid_pinpoints", None) is not None)


def _own_cache_class(config, prunes_sequence: bool, positioned: bool):
    """The DynamicCache generate() needs: H2O's per-position scores (ScoredCache), with a language-model policy
    the count of positions that entered each layer (CountedCache; see _mask_held_padding), and on a model with
    sliding-window layers the positions of each layer's entries (PositionedCache)."""
    from tokensparse.runtime.counted_cache import CountedCache, CountedScoredCache
    from tokensparse.runtime.positioned_cache import PositionedCache, PositionedScoredCache
    from tokensparse.runtime.scored_cache import ScoredCache

    if positioned:
        return PositionedScoredCache if config.kv.scored else PositionedCache
    if prunes_sequence:
        return CountedScoredCache if config.kv.scored else CountedCache
    return ScoredCache


def _generate_with_own_cache(fast, generate, cache_class) -> None:
    """Make fast.generate() start from a `cache_class` unless given a cache."""

    @functools.wraps(generate)
    def generate_with_own_cache(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache_class(fast.config)
        return generate(fast, *args, **kwargs)

    fast.generate = generate_with_own_cache


def own_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` with its own submodule and hook tables (the same parameters and buffers):
    replacing a child of the copy, or hooking it, leaves the original alone."""
    duplicate = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):
            duplicate.__dict__[name] = copy.copy(value)
    return duplicate


def _cut_decode_masks(fast, cut) -> bool:
    """Give `fast` its own copies of the modules down to its decoder layers, each layer with a forward
    pre-hook that cuts a decode step's 4-D padding mask to that layer's cache length (`cut`: which columns).
    Returns False for a model whose decoder layers are not found (padded prompts then stay refused).

    Language-model pruning (_first_columns): generate() builds the mask once, as long as layer 0's cache; a
    pruned layer holds fewer positions. Its cache is the kept prompt positions in order, then the generated
    ones. Left padding puts every padding position first, and no policy drops a padding position (they are
    text). So the first columns of the mask are that layer's mask.

    KV eviction (_last_columns): the forward hands decode steps a mask over every position seen
    (evicted_cache_mask). The policies rank padding below every real position and keep positions in order,
    so an evicted cache holds padding only when it holds every real position seen, and then as many padding
    positions as it has slots left, first. So the last columns of the mask are that layer's mask."""
    return hook_decoder_layers(fast, functools.partial(_cut_mask_to_cache, cut))


def hook_decoder_layers(fast, hook) -> bool:
    """Give `fast` its own copies of the modules down to its decoder layers and register
    hook(index, module, args, kwargs) as each layer's forward pre-hook (with kwargs). False for a model whose
    decoder layers are not found."""
    try:
        layers = fast.get_decoder().layers
    except (AttributeError, NotImplementedError):
        return False
    path = next((name for name, module in fast.named_modules() if module is layers), None)
    if path is None or not isinstance(layers, torch.nn.ModuleList):
        return False
    parent = fast
    for name in path.split("."):
        parent._modules[name] = own_copy(parent._modules[name])
        parent = parent._modules[name]
    for index, name in enumerate(list(parent._modules)):
        layer = parent._modules[name] = own_copy(parent._modules[name])
        layer.register_forward_pre_hook(functools.partial(hook, index), with_kwargs=True)
    return True


def _cut_mask_to_cache(cut, index: int, module, args, kwargs):
    mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or cache is None or is_static_cache(cache):
        return None                     # a StaticCache's mask spans its buffers' slots (passes/evict_kv.py)
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


def _is_2d(mask) -> bool:
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
        if _sequence_policy(config) is not None and not getattr(cache, "counts_entries", False):
            raise ValueError(f"{_sequence_option(config)} and kv={config.kv.name} together on a padded batch need "
                             f"the cache to count the positions that entered each layer: let generate() make it (pass "
                             f"no past_key_values), or pass tokensparse.CountedCache()")
        check_left_padding(mask)
    if not layers_cut_masks or cache is None or cache.get_seq_length() == 0:
        return mask
    embedded = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    queries = embedded.shape[1]
    return position_mask(fast, mask, queries, mask.shape[-1] - queries)


class _StaticDecodeMasks:
    """The masks of decode steps into a StaticCache. Its slots stop following positions once a policy prunes or
    evicts, so every decode graph's attention gets a mask over its own layer's slots (passes/static_slot_masks.py).
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
        if not is_static_cache(cache) or _cache_is_empty(cache) or not (mask is None or _is_2d(mask)):
            return self.create_masks(*args, **kwargs)
        self.last = None if mask is None else self._over_positions(mask, kwargs["inputs_embeds"].shape[1], cache)
        return self.last

    def decode_mask(self, kwargs):
        """The forward's mask: a decode step's 2-D mask becomes the mask above; a 4-D one must be the one
        generate() got from create_masks_for_generate."""
        mask, cache = kwargs.get("attention_mask"), kwargs["past_key_values"]
        if _cache_is_empty(cache) or mask is None or mask is self.last:
            return mask
        if _is_2d(mask):
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
        if _sequence_policy(self.config) is not None:
            raise ValueError(f"{_sequence_option(self.config)} on a padded batch into a StaticCache needs "
                             f"max_cache_len >= the positions seen ({seen}), not {width}")
        return position_mask(self.fast, mask[:, seen - width:], queries, width - queries)


def _hand_static_decode_masks(fast, config) -> _StaticDecodeMasks:
    """Make generate() build fast's StaticCache decode masks with _StaticDecodeMasks."""
    from transformers.masking_utils import create_masks_for_generate

    handed = _StaticDecodeMasks(fast, config, getattr(fast, "create_masks_for_generate", create_masks_for_generate))
    fast.create_masks_for_generate = handed.create_masks_for_generate
    return handed


def _cache_is_empty(cache) -> bool:
    return int(cache.get_seq_length()) == 0


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


def _sequence_policy(config):
    """The policy that shortens the language model's sequence: llm=, else vision= (in a VLM's tower), or None."""
    return config.llm if config.llm is not None else config.vision


def _sequence_option(config) -> str:
    """How the user named that policy: "llm=fastv", "vision=tome"."""
    return f"{'llm' if config.llm is not None else 'vision'}={_sequence_policy(config).name}"


def is_static_cache(cache) -> bool:
    """A transformers StaticCache (fixed buffers written at a per-layer cumulative_length)."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    return any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ()))


def check_static_cache(config, attention_mask, cache) -> None:
    """What works with a StaticCache: KV policies, language-model policies (llm=, vision= in a VLM's tower) and
    both together, also on left-padded batches; both on a padded batch need a CountedStaticCache."""
    if (_sequence_policy(config) is None or config.kv is None or getattr(cache, "counts_entries", False)
            or not _pads(attention_mask, cache)):
        _check_left_padded_prefill(attention_mask, cache)
        return
    raise ValueError(f"{_sequence_option(config)} and kv={config.kv.name} together on a padded batch need the "
                     f"StaticCache to count the positions that entered each layer: pass past_key_values="
                     f"tokensparse.CountedStaticCache(model.config, max_cache_len"
                     f"{', scores=True' if config.kv.scored else ''})")


def _check_left_padded_prefill(attention_mask, cache) -> None:
    """A prefill into an empty StaticCache: its mask (2-D, or generate()'s 4-D one over the buffer's slots) must
    pad on the left."""
    if not isinstance(attention_mask, torch.Tensor) or not _cache_is_empty(cache):
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


def check_left_padding(attention_mask) -> None:
    """Pruning a padded batch needs the padding on the left (each row 0...0 1...1), as generate() expects."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    rows = attention_mask.bool()
    wrong = (rows[:, :-1] & ~rows[:, 1:]).any(dim=1)
    if bool(wrong.any()):
        raise ValueError(f"attention_mask pads samples {wrong.nonzero()[:, 0].tolist()} on the right (or in the "
                         f"middle): pruning a padded batch needs left padding (tokenizer.padding_side = 'left')")
