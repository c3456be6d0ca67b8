"""Hooks inside rewritten blocks: their Python sees the traced token count, which tokensparse.compile says."""

import warnings

import pytest
import torch

import tokensparse
from tests.models import build
from tokensparse.reference import reference_forward


def test_a_hooked_block_after_the_cut_is_named_in_a_warning():
    model, pixels = build("timm_vit")
    seen = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        fast = tokensparse.compile(model, {"policy": "tome", "r": 4, "inductor": False})
        with pytest.warns(tokensparse.TokensparseWarning, match=r"blocks\.1 has forward hooks .* sees the 65 traced"):
            with torch.no_grad():
                out = fast(pixels)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(out, reference_forward(model, pixels, tokensparse.ToMe(r=4))["logits"])


def test_hooks_outside_the_blocks_are_not_warned_about():
    model, pixels = build("timm_vit")
    handle = model.head.register_forward_hook(lambda module, args, out: None)
    try:
        fast = tokensparse.compile(model, {"policy": "tome", "r": 4, "inductor": False})
        with warnings.catch_warnings():
            warnings.simplefilter("error", tokensparse.TokensparseWarning)
            with torch.no_grad():
                fast(pixels)
    finally:
        handle.remove()
