"""What tokensparse reads from a Hugging Face model: whether it generates, its output hooks, its vision path."""

from __future__ import annotations

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


def tower_splits_graph(model) -> bool:
    """Whether the model's vision path reads image sizes in Python and splits into many graphs: a grid of
    variable resolution (`image_grid_thw`: Qwen2-VL, Qwen2.5-VL, read with .tolist()) or anyres tiling
    (`image_grid_pinpoints`: LLaVA-NeXT, LLaVA-OneVision, which pick a tiling per image size). generate()
    runs such towers eagerly before the prefill, whose graph then holds the feature merge and the whole
    language model."""
    return ("image_grid_thw" in inspect.signature(model.forward).parameters
            or getattr(model.config, "image_grid_pinpoints", None) is not None)


def vision_token_ids(config) -> list[int]:
    """The ids of the placeholders a model fills with image or video features (LLaVA's `image_token_index`,
    LLaVA-OneVision's `video_token_index`; Qwen2-VL's `image_token_id` and `video_token_id`)."""
    ids = [getattr(config, name, None) for name in ("image_token_index", "image_token_id", "video_token_index",
                                                    "video_token_id")]
    return sorted({token for token in ids if token is not None})


def vision_token_mask(config, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] True at the placeholders the model fills with image or video features (vision_token_ids); a
    comparison per id, which runs before a compiled prefill."""
    ids = vision_token_ids(config)
    if not ids:
        raise TypeError(f"{type(config).__name__} names no image or video token id")
    mask = input_ids == ids[0]
    for token in ids[1:]:
        mask = mask | (input_ids == token)
    return mask
