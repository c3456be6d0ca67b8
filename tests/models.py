"""Seeded factories of real vision-transformer architectures (timm, transformers) from small configs with random
weights: no downloads. build(name, **overrides) -> (model.eval(), pixel_values)."""

from __future__ import annotations

import torch

IMAGE = 32
SEED = 0

# name -> prefix tokens the model puts in front of its patches (CLS, distillation, registers).
PREFIX_TOKENS = {
    "timm_vit": 1,
    "timm_deit_distilled": 2,
    "timm_vit_reg4": 5,
    "timm_vit_gap": 0,
    "timm_vit_qknorm": 1,
    "hf_vit": 1,
    "hf_clip": 1,
    "hf_siglip": 0,
    "hf_dinov2": 1,
}
VISION_FAMILIES = list(PREFIX_TOKENS)
TIMM_FAMILIES = [name for name in VISION_FAMILIES if name.startswith("timm")]
HF_FAMILIES = [name for name in VISION_FAMILIES if name.startswith("hf")]


def _timm(variant: str, depth, width, heads, patch, num_classes=10, **kwargs):
    import timm

    return timm.create_model(variant, pretrained=False, img_size=IMAGE, patch_size=patch, embed_dim=width,
                             depth=depth, num_heads=heads, num_classes=num_classes, **kwargs)


def _hf_common(depth, width, heads, patch, **kwargs):
    return dict(image_size=IMAGE, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                num_attention_heads=heads, **kwargs)


def _make(name: str, depth: int, width: int, heads: int, patch: int, **kwargs) -> torch.nn.Module:
    if name == "timm_vit":
        return _timm("vit_tiny_patch16_224", depth, width, heads, patch, **kwargs)
    if name == "timm_deit_distilled":
        return _timm("deit_tiny_distilled_patch16_224", depth, width, heads, patch, **kwargs)
    if name == "timm_vit_reg4":  # like vit_*_reg4_dinov2: CLS + 4 registers, pos embed on patches only
        options = dict(reg_tokens=4, no_embed_class=True, init_values=0.5)
        return _timm("vit_tiny_patch16_224", depth, width, heads, patch, **{**options, **kwargs})
    if name == "timm_vit_gap":  # no prefix tokens, average pooling + fc_norm
        options = dict(class_token=False, global_pool="avg")
        return _timm("vit_tiny_patch16_224", depth, width, heads, patch, **{**options, **kwargs})
    if name == "timm_vit_qknorm":  # q/k LayerNorm (keys after k_norm feed ToMe) and LayerScale
        options = dict(qk_norm=True, init_values=0.5)
        return _timm("vit_tiny_patch16_224", depth, width, heads, patch, **{**options, **kwargs})
    if name == "hf_vit":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig(**_hf_common(depth, width, heads, patch, intermediate_size=4 * width,
                                               pooler_output_size=width, **kwargs)))
    if name == "hf_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(**_hf_common(depth, width, heads, patch,
                                                             intermediate_size=4 * width, **kwargs)))
    if name == "hf_siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(SiglipVisionConfig(**_hf_common(depth, width, heads, patch,
                                                                 intermediate_size=4 * width, **kwargs)))
    if name == "hf_dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**_hf_common(depth, width, heads, patch, mlp_ratio=4, **kwargs)))
    raise ValueError(f"unknown model {name!r}; known: {VISION_FAMILIES}")


def build(name: str, *, depth: int = 3, width: int = 32, heads: int = 2, patch: int = 4, batch: int = 2,
          seed: int = SEED, **kwargs):
    """(model.eval(), pixel_values [batch, 3, 32, 32]) for a small real architecture; kwargs go to the
    timm model / transformers config. Same arguments, same weights and inputs."""
    torch.manual_seed(seed)
    model = _make(name, depth, width, heads, patch, **kwargs).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    return model, pixel_values


def vit_b16(batch: int = 1, seed: int = SEED):
    """timm vit_base_patch16_224 with random weights and (model.eval(), pixel_values [batch, 3, 224, 224])."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    pixel_values = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
    return model, pixel_values


IMAGE_TOKEN = 299


def build_llava(*, text_layers: int = 4, image_tokens: int = 16, prompt=(3, 5), batch: int = 2, seed: int = SEED,
                hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = IMAGE_TOKEN + 1,
                vision_hidden: int = 32, vision_layers: int = 2, patch: int = 8, text_model: str = "llama",
                feature_layer: int = -1, feature_strategy: str = "default", images: int = 1):
    """(LlavaForConditionalGeneration.eval(), inputs) with a CLIP tower and a `text_model` (TEXT_MODELS, GQA),
    random weights; the image tokens (`image_tokens` patches, plus CLS with feature_strategy="full") sit
    between `prompt[0]` and `prompt[1]` text tokens; `images` > 1 puts that many images (screenshots) there,
    two text tokens between each. The image token id is the last of the vocabulary."""
    import os

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    import transformers as T

    torch.manual_seed(seed)
    side = int(image_tokens ** 0.5)
    image_token = vocab - 1
    vision = T.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=patch * side,
                                patch_size=patch)
    text = text_config(text_model, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                           vision_feature_select_strategy=feature_strategy, vision_feature_layer=feature_layer)
    model = T.LlavaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    before, after = prompt
    pieces = [torch.randint(0, image_token - 9, (batch, before), generator=generator)]
    for index in range(images):
        if index:
            pieces.append(torch.randint(0, image_token - 9, (batch, 2), generator=generator))
        pieces.append(torch.full((batch, side * side + (feature_strategy == "full")), image_token))
    input_ids = torch.cat(pieces + [torch.randint(0, image_token - 9, (batch, after), generator=generator)], dim=1)
    pixel_values = torch.randn(batch * images, 3, patch * side, patch * side, generator=generator)
    return model, {"input_ids": input_ids, "pixel_values": pixel_values}


def build_llava_onevision(*, batch: int = 2, text_layers: int = 4, prompt=(4, 5), seed: int = SEED, vocab: int = 300):
    """(LlavaOnevisionForConditionalGeneration.eval(), inputs), random weights: a SigLIP tower on 32 x 32 tiles,
    a Qwen2 text model, and one 32 x 64 image per sample (anyres: the base tile and two crops, packed with
    newline tokens), its image-token count taken from the model's own packing."""
    import os

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    import transformers as T

    from tokensparse.runtime.hf_model import install_output_hooks

    torch.manual_seed(seed)
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    text = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096)
    config = T.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                                    video_token_index=vocab - 2, image_grid_pinpoints=[[32, 32], [32, 64]])
    model = T.LlavaOnevisionForConditionalGeneration(config).eval()
    install_output_hooks(model)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 3, 32, 32, generator=generator)
    image_sizes = torch.tensor([[32, 64]] * batch)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    input_ids = torch.cat([torch.randint(0, vocab - 10, (batch, prompt[0]), generator=generator),
                           torch.full((batch, features[0].shape[0]), vocab - 1),
                           torch.randint(0, vocab - 10, (batch, prompt[1]), generator=generator)], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
                   "image_sizes": image_sizes}


def build_qwen2_vl(*, video: tuple = (4, 8, 8), image: tuple | None = None, repeated: tuple = (), batch: int = 2,
                   text_layers: int = 4, prompt=(5, 6), seed: int = SEED, hidden: int = 64, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 128, vocab: int = 300, family: str = "qwen2_vl"):
    """(Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration .eval(), inputs), random weights,
    with a video of `video` = (temporal patches, height patches, width patches), and optionally an image of
    `image` = (height, width) patches before it, between `prompt` text tokens. Each temporal patch in
    `repeated` shows the same pixels as the one before it (a static scene there). Inputs are what the
    processor returns: input_ids, attention_mask, mm_token_type_ids and the pixels with their grids."""
    import os

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    import transformers as T

    torch.manual_seed(seed)
    image_token, video_token, start, end = vocab - 1, vocab - 2, vocab - 3, vocab - 4
    vision = dict(depth=2, hidden_size=hidden, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    vision.update(embed_dim=32) if family == "qwen2_vl" else vision.update(intermediate_size=64, out_hidden_size=hidden,
                                                                           fullatt_block_indexes=[1], window_size=16)
    head = hidden // heads                # M-RoPE splits head / 2 frequencies into temporal, height, width
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [head // 8, 3 * head // 16, 3 * head // 16],
                                 "rope_theta": 10000.0})
    configs = {"qwen2_vl": (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration),
               "qwen2_5_vl": (T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration)}
    config_class, model_class = configs[family]
    config = config_class(vision_config=vision, text_config=text, image_token_id=image_token,
                          video_token_id=video_token, vision_start_token_id=start, vision_end_token_id=end)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    patch_values = 3 * 2 * 4 * 4

    def text_tokens(count):
        return torch.randint(0, vocab - 10, (batch, count), generator=generator)

    def span(token, count):
        return [torch.full((batch, 1), start), torch.full((batch, count), token), torch.full((batch, 1), end)]

    pieces, inputs = [text_tokens(prompt[0])], {}
    if image is not None:
        height, width = image
        pieces += span(image_token, height * width // 4)
        inputs["pixel_values"] = torch.randn(batch * height * width, patch_values, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([[1, height, width]] * batch)
    frames, height, width = video
    pieces += span(video_token, frames * height * width // 4) + [text_tokens(prompt[1])]
    pixels = torch.randn(batch, frames, height * width, patch_values, generator=generator)
    for frame in repeated:
        pixels[:, frame] = pixels[:, frame - 1]
    inputs["pixel_values_videos"] = pixels.reshape(-1, patch_values)
    inputs["video_grid_thw"] = torch.tensor([[frames, height, width]] * batch)
    input_ids = torch.cat(pieces, dim=1)
    types = torch.where(input_ids == image_token, 1, torch.where(input_ids == video_token, 2, 0))
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": types,
                   **inputs}


# Decoder-only text models the language-model and KV passes are tested on: Llama, Qwen2 (q/k/v biases) and
# Mistral (a sliding window, longer than the tests' prompts).
TEXT_MODELS = ("llama", "qwen2", "mistral")


def text_config(family: str, **sizes):
    """A transformers config of a decoder-only text model of `family` with the given sizes."""
    import transformers as T

    configs = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}
    if family not in configs:
        raise ValueError(f"text model {family!r} is unknown: choose one of {sorted(configs)}")
    return configs[family](**sizes)


def build_llama(*, layers: int = 2, prompt: int = 40, batch: int = 2, seed: int = SEED, hidden: int = 64,
                heads: int = 4, kv_heads: int = 2, vocab: int = 300, family: str = "llama", **config):
    """(XForCausalLM.eval(), inputs) of a text model `family` (TEXT_MODELS) with GQA and random weights, and
    any other `config` fields (sliding_window=...); inputs hold input_ids and an all-ones attention_mask."""
    import os

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    import transformers as T

    torch.manual_seed(seed)
    config = text_config(family, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, **config)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def build_gemma3(*, batch: int = 2, text_layers: int = 4, window: int = 16, prompt=(5, 8), seed: int = SEED,
                 vocab: int = 300):
    """(Gemma3ForConditionalGeneration .eval(), inputs), random weights: every decoder layer a sliding-window
    one (`window`), one 16-token image between `prompt` text tokens, whose tokens see each other both ways
    (token_type_ids), as the processor marks them."""
    import transformers as T

    torch.manual_seed(seed)
    image, begin, end = vocab - 1, vocab - 3, vocab - 2
    text = T.Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                              layer_types=["sliding_attention"] * text_layers, max_position_embeddings=256)
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=4)
    config = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=image,
                            boi_token_index=begin, eoi_token_index=end)
    model = T.Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    words = [torch.randint(1, vocab - 10, (batch, count), generator=generator) for count in prompt]
    input_ids = torch.cat([words[0], torch.full((batch, 1), begin), torch.full((batch, 16), image),
                           torch.full((batch, 1), end), words[1]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "token_type_ids": (input_ids == image).long(),
                   "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


def build_paligemma(*, batch: int = 2, text_layers: int = 2, prompt: int = 6, seed: int = SEED, vocab: int = 300):
    """(PaliGemmaForConditionalGeneration .eval(), inputs), random weights: 16 image tokens, then a text prefix;
    image and prefix see each other both ways (token_type_ids 0 there), as the processor marks a prompt."""
    import transformers as T

    torch.manual_seed(seed)
    image = vocab - 1
    text = T.GemmaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=4, projection_dim=64)
    config = T.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=image, projection_dim=64)
    model = T.PaliGemmaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.cat([torch.full((batch, 16), image), torch.randint(1, vocab - 10, (batch, prompt),
                                                                          generator=generator)], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "token_type_ids": torch.zeros_like(input_ids),
                   "pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}


def build_mistral3(*, batch: int = 2, text_layers: int = 4, prompt=(3, 5), seed: int = SEED, vocab: int = 300):
    """(Mistral3ForConditionalGeneration .eval(), inputs), random weights: a Pixtral tower (8x8 patches of a
    32x32 image) whose patch merger joins 2x2 patches into 16 image tokens, between `prompt` text tokens."""
    import transformers as T

    torch.manual_seed(seed)
    image = vocab - 1
    text = T.MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=None)
    vision = T.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=4, head_dim=16)
    config = T.Mistral3Config(text_config=text, vision_config=vision, image_token_index=image, spatial_merge_size=2,
                              vision_feature_layer=-1)
    model = T.Mistral3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    words = [torch.randint(1, vocab - 10, (batch, count), generator=generator) for count in prompt]
    input_ids = torch.cat([words[0], torch.full((batch, 16), image), words[1]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator),
                   "image_sizes": torch.tensor([[32, 32]] * batch)}


def build_llama4(*, batch: int = 2, text_layers: int = 4, prompt=(3, 5), seed: int = SEED, vocab: int = 300):
    """(Llama4ForConditionalGeneration .eval(), inputs), random weights: chunked attention in all but the last
    decoder layer (attention_chunk_size 16), two experts per MoE layer, and a vision tower whose pixel shuffle
    turns 16 patches into 4 image tokens, between `prompt` text tokens."""
    import transformers as T

    torch.manual_seed(seed)
    image = vocab - 1
    text = T.Llama4TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                              num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=256, attention_chunk_size=16, num_local_experts=2,
                              num_experts_per_tok=1, interleave_moe_layer_step=1)
    vision = T.Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, vision_output_dim=64, projector_input_dim=64,
                                  projector_output_dim=64, pixel_shuffle_ratio=0.5)
    model = T.Llama4ForConditionalGeneration(T.Llama4Config(text_config=text, vision_config=vision,
                                                             image_token_index=image)).eval()
    generator = torch.Generator().manual_seed(seed)
    words = [torch.randint(1, vocab - 10, (batch, count), generator=generator) for count in prompt]
    input_ids = torch.cat([words[0], torch.full((batch, 4), image), words[1]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


def build_idefics3(*, batch: int = 2, text_layers: int = 4, prompt=(3, 5), seed: int = SEED, vocab: int = 300):
    """(Idefics3ForConditionalGeneration .eval(), inputs), random weights: a SigLIP-style tower over one 32x32
    image (64 patches) whose pixel-shuffle connector (scale factor 2) makes 16 image tokens, between `prompt`
    text tokens. Its image merge reads the image-token count with .item() (capture_scalar_outputs)."""
    import transformers as T

    torch.manual_seed(seed)
    image = vocab - 1
    text = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    vision = T.Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=4)
    model = T.Idefics3ForConditionalGeneration(T.Idefics3Config(text_config=text, vision_config=vision,
                                                                 image_token_id=image, scale_factor=2)).eval()
    generator = torch.Generator().manual_seed(seed)
    words = [torch.randint(1, vocab - 10, (batch, count), generator=generator) for count in prompt]
    input_ids = torch.cat([words[0], torch.full((batch, 16), image), words[1]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "pixel_values": torch.randn(batch, 1, 3, 32, 32, generator=generator)}


def build_qwen3_vl(*, batch: int = 2, text_layers: int = 4, patches: int = 8, prompt=(4, 5), seed: int = SEED,
                   vocab: int = 300):
    """(Qwen3VLForConditionalGeneration .eval(), inputs), random weights: one image of `patches` x `patches`
    patches (merged 2x2 into image tokens) between `prompt` text tokens, deepstack features from the tower's
    blocks 0 and 1 added into the first decoder layers, interleaved M-RoPE."""
    import os

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    import transformers as T

    torch.manual_seed(seed)
    image, start, end = vocab - 1, vocab - 3, vocab - 4
    vision = dict(depth=3, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, intermediate_size=64, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    config = T.Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=image, video_token_id=vocab - 2,
                             vision_start_token_id=start, vision_end_token_id=end)
    model = T.Qwen3VLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    words = [torch.randint(0, vocab - 10, (batch, count), generator=generator) for count in prompt]
    input_ids = torch.cat([words[0], torch.full((batch, 1), start), torch.full((batch, patches * patches // 4), image),
                           torch.full((batch, 1), end), words[1]], dim=1)
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "mm_token_type_ids": (input_ids == image).long(),
                   "pixel_values": torch.randn(batch * patches * patches, 3 * 2 * 4 * 4, generator=generator),
                   "image_grid_thw": torch.tensor([[1, patches, patches]] * batch)}
