"""tokensparse.compile() for a Hugging Face model with generate(): a copy whose forward is compiled with the
tokensparse backend, so that generate() runs the pruned prefill (the vision tower runs inside forward) and decodes
from the pruned KV cache. torch.compile(model).generate() would compile nothing: generate() calls the model's own
forward."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import torch

from tokensparse.capture import ISOLATED_RECOMPILES
from tokensparse.config import sequence_policy
from tokensparse.runtime.cache_kind import is_static_cache
from tokensparse.runtime.cache_positions import at_cache_positions, cache_positions_config
from tokensparse.runtime.decode_masks import cut_masks_per_layer, evicted_cache_mask, is_2d
from tokensparse.runtime.generate_cache import generate_with_own_cache, own_cache_class
from tokensparse.policies.fastv import image_count
from tokensparse.runtime.hf_model import install_output_hooks, tower_splits_graph, vision_token_ids, vision_token_mask
from tokensparse.runtime.model_copy import own_copy
from tokensparse.runtime.padding_checks import check_left_padding, check_static_cache
from tokensparse.runtime.positioned_cache import records_positions
from tokensparse.runtime.sliding_window import (check_forward_within_window, layer_windows, refuse_chunked_attention,
                                                refuse_generation_past_window, sliding_window)
from tokensparse.runtime.static_decode_masks import hand_static_decode_masks
from tokensparse.scalar_outputs import ScalarOutputs
from tokensparse.warn import warnings_per_call

# Forward arguments that carry an image: raw pixels, or the features generate() encodes before prefill.
_IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "image_features")


def compile_for_generate(model, config, **torch_compile_kwargs):
    """A shallow copy of `model` (same weights) whose forward is compiled with the tokensparse backend and
    `config`; the model passed in is not changed."""
    from tokensparse.backend import tokensparse_backend      # looked up per call: tests count what it compiles

    if config.kv is not None:
        refuse_chunked_attention(model, config.kv.name)
    install_output_hooks(model)
    fast = own_copy(model)
    if getattr(model, "generation_config", None) is not None:
        # forward is compiled already: generate() must not wrap it in a second torch.compile (it does so by
        # default on GPUs with a StaticCache), which would trace through it without the tokensparse backend
        fast.generation_config = copy.deepcopy(model.generation_config)
        fast.generation_config.disable_compile = True
    prunes_sequence = sequence_policy(config) is not None
    # A dense batch needs as many image tokens in every sample: the forward checks the counts before the prefill
    # runs (one read to the host), and the graph takes its kept lengths from the image features' shape.
    counts_image_tokens = bool(config.llm is not None and config.llm.equal_image_counts
                               and config.llm.vision_span is None and vision_token_ids(model.config))
    facts = cut_masks_per_layer(fast, prunes_sequence, evicts=config.kv is not None)
    facts = dataclasses.replace(facts, image_counts_checked=counts_image_tokens)
    handed = hand_static_decode_masks(fast, config)
    window = sliding_window(model) if config.kv is not None else None
    config, cache_positions = cache_positions_config(model, config, prunes_sequence, window)   # StreamingLLM's
    positioned = window is not None and not prunes_sequence      # sliding windows over recorded positions
    if positioned:
        facts = dataclasses.replace(facts, sliding_windows=layer_windows(model, window))
    backend = functools.partial(tokensparse_backend, options=config, facts=facts)
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
            if counts_image_tokens:
                _check_image_counts(model.config, kwargs.get("input_ids"))
        if window is not None and not (positioned and records_positions(kwargs.get("past_key_values"))):
            check_forward_within_window(window, config.kv.name, kwargs)
        if is_static_cache(kwargs.get("past_key_values")):
            check_static_cache(config, kwargs.get("attention_mask"), kwargs["past_key_values"])
            kwargs["attention_mask"] = handed.decode_mask(kwargs)
        elif config.kv is not None and is_2d(kwargs.get("attention_mask")):
            kwargs["attention_mask"] = evicted_cache_mask(fast, config, facts.kv_masks_follow_cache, kwargs)
        # The warnings are about the graphs that matter: a graph break's fragments are quiet when the prefill was
        # rewritten. capture_scalar_outputs only while this model's code traces with it (scalar_outputs.py).
        with warnings_per_call(model):
            return scalar_outputs(compiled, *args, **kwargs)

    if not tower_splits_graph(model):
        _encode_images_in_forward(forward)
    fast.forward = forward
    if config.kv is not None and (config.kv.scored or facts.kv_masks_follow_cache and prunes_sequence or positioned):
        generate_with_own_cache(fast, type(model).generate, own_cache_class(config, prunes_sequence, positioned))
    if window is not None:
        refuse_generation_past_window(fast, window, config.kv.name, positioned)
    return fast


def _check_image_counts(model_config, input_ids) -> None:
    """Every sample holds as many image tokens (fastv.image_count), or a ValueError that names the counts."""
    if input_ids is None:
        raise ValueError("pruning inside the language model reads where the image tokens are from input_ids: pass "
                         "input_ids with the images (not inputs_embeds)")
    image_count(vision_token_mask(model_config, input_ids))


def _encode_images_in_forward(forward) -> None:
    """Hide `mm_encoder_outputs` from the compiled forward's signature. generate() then hands the prefill the
    pixels instead of running the vision tower eagerly before it: the tower is compiled with the prefill, and
    a policy that acts inside it (VisionZip) finds it there."""
    signature = inspect.signature(forward)
    forward.__signature__ = signature.replace(parameters=[
        parameter for name, parameter in signature.parameters.items() if name != "mm_encoder_outputs"])
