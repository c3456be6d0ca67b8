"""Hugging Face helpers: compile a generative model's forward with the tokensparse backend so that
model.generate() runs pruned prefill (the vision tower runs inside forward) and decodes from the pruned
KV cache. torch.compile(model).generate() would compile nothing: generate() calls the model's own forward."""

from __future__ import annotations

import copy
import functools

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


def compile_for_generate(model, config, **torch_compile_kwargs):
    """A shallow copy of `model` (same weights) whose forward is compiled with the tokensparse backend and
    `config`; the model passed in is not changed."""
    from tokensparse.backend import tokensparse_backend

    install_output_hooks(model)
    fast = copy.copy(model)
    backend = functools.partial(tokensparse_backend, options=config)
    compiled = torch.compile(type(model).forward.__get__(fast), backend=backend, **torch_compile_kwargs)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        # The image merge counts image tokens with .item(); without this it splits the graph there.
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return compiled(*args, **kwargs)

    fast.forward = forward
    if config.kv is not None and config.kv.scored:
        _generate_with_scored_cache(fast, type(model).generate)
    return fast


def _generate_with_scored_cache(fast, generate) -> None:
    """Make fast.generate() start from a ScoredCache (H2O's per-position scores) unless given a cache."""
    from tokensparse.runtime.scored_cache import ScoredCache

    @functools.wraps(generate)
    def scored_generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = ScoredCache(fast.config)
        return generate(fast, *args, **kwargs)

    fast.generate = scored_generate
