"""The policy's own eager reference: an independent hand-written forward of each supported vision encoder
that applies a ToMe/TopK policy where the graph rewrite does (after each block's attention residual add)."""

from __future__ import annotations

import importlib

import torch

# (library whose classes the model derives from, family module); the family checks the exact class.
FAMILIES = (
    ("timm", "timm_vit"),
    ("transformers", "hf_vit"),
    ("transformers", "hf_clip"),
    ("transformers", "hf_siglip"),
    ("transformers", "hf_dinov2"),
)


def _libraries(model) -> set[str]:
    return {cls.__module__.split(".")[0] for cls in type(model).__mro__}


def reference_forward(model, pixel_values: torch.Tensor, policy=None) -> dict[str, torch.Tensor]:
    """Eager forward of `model` with `policy` (None: unmodified) applied; timm -> {"logits", "tokens"},
    transformers -> {"last_hidden_state", "pooler_output"}."""
    libraries = _libraries(model)
    for library, family in FAMILIES:
        if library not in libraries:
            continue
        module = importlib.import_module(f"tokensparse.reference.{family}")
        if module.supports(model):
            return module.forward(model, pixel_values, policy)
    supported = "timm VisionTransformer, transformers ViTModel, CLIPVisionModel, SiglipVisionModel, Dinov2Model"
    raise TypeError(f"reference_forward does not support {type(model).__module__}.{type(model).__qualname__}; "
                    f"supported: {supported}")


__all__ = ["FAMILIES", "reference_forward"]
