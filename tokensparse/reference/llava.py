"""Eager FastV oracle for LLaVA-style models: the reference a compiled FastV must equal. Layer K-1's
attention picks the kept image tokens (eager attention weights); from layer K on, the dropped tokens'
key columns are masked out, so the kept tokens compute exactly what they would with the dropped tokens
removed, at their original positions."""

from __future__ import annotations

import math

import torch

from tokensparse.policies.fastv import fastv_keep, text_row_mean


def _language_layers(model):
    inner = getattr(model, "model", model)
    language = getattr(inner, "language_model", None)
    if language is None or not hasattr(language, "layers"):
        raise TypeError(f"{type(model).__name__} has no model.language_model.layers (a LLaVA-style model)")
    return language.layers


def fastv_masked_forward(model, inputs: dict, layer: int, keep: float, query: str = "last") -> dict:
    """{"logits": [B, S, V], "kept": [B, S'] positions} of FastV at decoder layer `layer` by masking."""
    layers = _language_layers(model)
    if not 1 <= layer < len(layers):
        raise ValueError(f"layer={layer} is out of range: FastV needs 1 <= layer < {len(layers)} (the model's "
                         f"language model has {len(layers)} layers)")
    image_mask = inputs["input_ids"] == model.config.image_token_index
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = []
    try:
        with torch.no_grad():
            probabilities = model(**inputs, output_attentions=True).attentions[layer - 1].float()
            if query == "last":
                scores = probabilities[:, :, -1].mean(dim=1)
            else:
                scores = text_row_mean(probabilities, image_mask)
            kept = fastv_keep(scores, image_mask, keep)
            mask = _kept_causal_mask(kept, image_mask.shape[1], probabilities.dtype)

            def use_mask(module, args, kwargs):
                kwargs["attention_mask"] = mask.to(kwargs["hidden_states"].dtype if "hidden_states" in kwargs
                                                   else args[0].dtype)
                return args, kwargs

            handles = [block.register_forward_pre_hook(use_mask, with_kwargs=True) for block in layers[layer:]]
            logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return {"logits": logits, "kept": kept}


def _kept_causal_mask(kept: torch.Tensor, sequence: int, dtype) -> torch.Tensor:
    """Additive [B, 1, S, S]: causal, and only kept positions as keys."""
    columns = torch.zeros(kept.shape[0], sequence, dtype=torch.bool).scatter(1, kept, True)
    causal = torch.ones(sequence, sequence, dtype=torch.bool).tril()
    allowed = causal[None, None] & columns[:, None, None, :]
    allowed |= torch.eye(sequence, dtype=torch.bool)[None, None]      # a dropped row still sees itself
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, -math.inf)
