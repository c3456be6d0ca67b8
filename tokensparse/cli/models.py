"""The models that `tokensparse export` and `tokensparse explain` build: a timm name, a Hugging Face vision config
or checkpoint directory, or a Hugging Face LLaVA config directory (with an example prompt)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from tokensparse.cli.errors import UserError

TEXT_AROUND_IMAGE = (8, 8)        # example prompt: text tokens before and after the image tokens


@dataclass
class LoadedModel:
    model: torch.nn.Module            # in eval mode
    image: tuple                      # one image's shape [C, H, W]
    inputs: Union[torch.Tensor, dict]  # pixels [B, C, H, W], or a VLM's keyword inputs


def load_model(name: str, random_init: bool, checkpoint: Optional[str], batch: int) -> LoadedModel:
    """The model and an example batch from a timm name or a HF directory (random seeded weights with
    `random_init`)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if os.path.isdir(name):
        return _load_transformers(name, random_init, batch, generator)
    import timm

    if not timm.is_model(name):
        raise UserError(f"--model {name!r} is neither a timm model name nor a directory with a Hugging Face "
                        f"config.json")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint {checkpoint!r}: file not found")
    try:
        model = timm.create_model(name, pretrained=not (random_init or checkpoint))
    except Exception as error:  # noqa: BLE001 - a failed download, said plainly
        raise UserError(f"could not load pretrained weights for {name!r} ({type(error).__name__}); use "
                        f"--random-init or --checkpoint FILE") from error
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    image = tuple(model.default_cfg.get("input_size", (3, 224, 224)))
    return LoadedModel(model.eval(), image, torch.randn(batch, *image, generator=generator))


def _load_transformers(directory: str, random_init: bool, batch: int, generator) -> LoadedModel:
    import transformers

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise UserError(f"--model {directory!r} is a directory without a config.json")
    config = transformers.AutoConfig.from_pretrained(directory)
    if getattr(config, "model_type", None) == "llava":
        return _load_llava(directory, config, random_init, batch, generator)
    vision = getattr(config, "vision_config", None) or config
    if random_init:
        model = transformers.AutoModel.from_config(vision)
    else:
        model = transformers.AutoModel.from_pretrained(directory)
        model = getattr(model, "vision_model", model)
    size = getattr(vision, "image_size", 224)
    image = (getattr(vision, "num_channels", 3), size, size)
    return LoadedModel(model.eval(), image, torch.randn(batch, *image, generator=generator))


def _load_llava(directory: str, config, random_init: bool, batch: int, generator) -> LoadedModel:
    """LlavaForConditionalGeneration and a prompt: text, one image's tokens, text."""
    from transformers import LlavaForConditionalGeneration

    if random_init:
        model = LlavaForConditionalGeneration(config)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(directory)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    image_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    image = (getattr(vision, "num_channels", 3), vision.image_size, vision.image_size)
    text = config.text_config.vocab_size
    image_token = config.image_token_id
    before, after = TEXT_AROUND_IMAGE
    words = [token for token in range(min(text, 1000)) if token != image_token]
    pick = torch.tensor(words)[torch.randint(0, len(words), (batch, before + after), generator=generator)]
    input_ids = torch.cat([pick[:, :before], torch.full((batch, image_tokens), image_token), pick[:, before:]], 1)
    pixel_values = torch.randn(batch, *image, generator=generator)
    return LoadedModel(model.eval(), image, {"input_ids": input_ids, "pixel_values": pixel_values})
