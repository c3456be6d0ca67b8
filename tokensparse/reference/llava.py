"""Eager masking oracle for the language-model policies on LLaVA-style models: the reference a compiled
policy must equal. Each stage's kept set is chosen from eager attention weights or the layer's own modules;
from that stage's layer on, the dropped tokens' key columns are masked out, so the kept tokens compute
exactly what they would with the dropped tokens removed, at their original positions (or, with
positions="compact", at their ranks among the surviving positions: each layer's RoPE tables are rebuilt from
those ranks). The same masks and positions apply to decode steps, so generate() here is the reference for
the pruned KV cache."""

from __future__ import annotations

import contextlib
import math

import torch

from tokensparse.policies import LanguagePolicy
from tokensparse.policies.base import recorder
from tokensparse.policies.divprune import divprune_select
from tokensparse.policies.fastv import attended, kept_image_count, text_row_mean
from tokensparse.policies.language import Stage
from tokensparse.policies.visionzip import image_positions_of_rows, visionzip_select
from tokensparse.runtime.hf_model import vision_token_mask
from tokensparse.reference._common import run_blocks, self_attn_mlp, self_attn_out, self_attn_qkv


def language_layers(model):
    inner = getattr(model, "model", model)
    language = getattr(inner, "language_model", getattr(inner, "text_model", None))    # Idefics3: text_model
    if language is not None and not hasattr(language, "layers"):     # Llama4: language_model.model.layers
        language = getattr(language, "model", None)
    if language is None or not hasattr(language, "layers"):
        raise TypeError(f"{type(model).__name__} has no model.language_model.layers (a LLaVA-style model)")
    return language.layers


def masked_forward(model, inputs: dict, policy: LanguagePolicy | None, vision=None) -> dict:
    """{"logits": [B, S, V], "kept": [B, S'] positions surviving the last stage, "stages": the positions
    surviving each stage} of `policy` applied by masking (after the vision-encoder policy `vision` in the tower)."""
    with torch.no_grad(), _applied(model, inputs, policy, vision) as columns:
        logits = model(**inputs).logits
    stages = [alive.nonzero()[:, 1].view(alive.shape[0], -1) for alive in columns.values()]
    return {"logits": logits, "kept": stages[-1], "stages": stages}


def masked_generate(model, inputs: dict, policy: LanguagePolicy | None, vision=None,
                    **generate_kwargs) -> torch.Tensor:
    """model.generate() with the policy's kept sets enforced by masks in prefill and every decode step."""
    with torch.no_grad(), _applied(model, inputs, policy, vision):
        return model.generate(**inputs, **generate_kwargs)


@contextlib.contextmanager
def _applied(model, inputs, policy: LanguagePolicy | None, vision=None):
    """The policy's surviving columns by stage, enforced by masks (and, for VisionZip or a vision-encoder
    policy in the tower, the tokens it leaves written into the projector's input) while the context is open."""
    layers = language_layers(model)
    rotary = _compact_rotary(model, policy) if policy is not None else None
    projector_input, columns = None, {}
    if vision is not None:
        columns, projector_input = _vision_encoder_policy(model, inputs, vision)
    elif policy is not None and policy.stage_in_tower:
        columns, projector_input = _visionzip(model, inputs, policy)
    with _replacing_projector_input(model, projector_input):
        if policy is not None and not policy.stage_in_tower:
            columns = _surviving_by_stage(model, inputs, policy, layers, rotary, columns)
        with _masking(layers, columns, rotary):
            yield columns


def _compact_rotary(model, policy: LanguagePolicy):
    """The language model's rotary embedding when `policy` renumbers positions (positions="compact"), else None."""
    if policy.positions != "compact":
        return None
    return getattr(model, "model", model).language_model.rotary_emb


def _surviving_by_stage(model, inputs, policy: LanguagePolicy, layers, rotary=None,
                        before: dict | None = None) -> dict[int, torch.Tensor]:
    """{stage layer: [B, S] bool, the positions surviving from that layer on}, stage by stage in order, after
    the surviving columns `before` (a vision-encoder policy's, from layer 0)."""
    policy.check_depth(len(layers))
    image_mask = _image_mask(model, inputs, policy)
    columns: dict[int, torch.Tensor] = dict(before or {})
    survivors = columns[0] if 0 in columns else torch.ones_like(image_mask)
    for stage in policy.stages():
        survivors = _choose(model, inputs, layers, stage, image_mask, survivors, columns, rotary)
        columns[stage.layer] = survivors
    return columns


def _visionzip(model, inputs, policy) -> tuple[dict, torch.Tensor]:
    """VisionZip from the vision tower's eager attention probabilities and keys at the feature layer:
    ({0: the surviving positions}, the projector's input with the contextual tokens at their targets)."""
    config = model.config
    tower = getattr(model, "model", model).vision_tower
    encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
    feature = config.vision_feature_layer % (len(encoder_layers) + 1)     # hidden_states index
    if not isinstance(config.vision_feature_layer, int) or feature == 0:
        raise ValueError("the VisionZip oracle needs one feature layer after the embeddings")
    attention = encoder_layers[feature - 1].self_attn
    captured = {}
    handle = attention.k_proj.register_forward_hook(lambda module, args, out: captured.__setitem__("k", out))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
        handle.remove()
    hidden, probabilities = out.hidden_states[feature], out.attentions[feature - 1].float()
    batch, tokens, _ = hidden.shape
    prefix = tokens - (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    offset = 1 if config.vision_feature_select_strategy == "default" else 0
    if prefix:
        scores = probabilities[:, :, 0, prefix:].mean(dim=1)
    else:
        scores = probabilities.mean(dim=2).mean(dim=1)
    keys = captured["k"].view(batch, tokens, attention.num_heads, -1).mean(dim=2)
    dominant = policy.patch_budget(prefix, offset < prefix, tokens - prefix)
    zipped, rows = visionzip_select(hidden, scores, keys, dominant, policy.contextual, prefix)
    image_mask = _image_mask(model, inputs, policy)
    kept = torch.zeros_like(image_mask).scatter(1, image_positions_of_rows(image_mask, rows, offset), True)
    return {0: kept}, zipped[:, offset:]


def _vision_encoder_policy(model, inputs, policy) -> tuple[dict, torch.Tensor]:
    """A vision-encoder policy (ToMe, TopK) in the tower, by the eager reference block loop up to the feature
    layer; each token it leaves fills the image position of its first source patch, found by replaying the
    recorded selections on sets of patch rows: ({0: the surviving positions}, the projector's input with
    those tokens at their rows and zeros elsewhere)."""
    config = model.config
    tower = getattr(model, "model", model).vision_tower
    vision_model = getattr(tower, "vision_model", tower)
    encoder_layers = vision_model.encoder.layers
    feature = config.vision_feature_layer % (len(encoder_layers) + 1)     # hidden_states index
    if not isinstance(config.vision_feature_layer, int) or feature == 0:
        raise ValueError("the vision-encoder oracle needs one feature layer after the embeddings")
    with torch.no_grad(), recorder.recording() as steps:
        x = vision_model.pre_layrnorm(vision_model.embeddings(inputs["pixel_values"]))
        hidden = run_blocks(x, list(encoder_layers[:feature]), policy, 1, self_attn_qkv, self_attn_out,
                            self_attn_mlp)
    batch, tokens, channels = x.shape
    rows = torch.tensor([[min(source) for source in _replayed_sources(steps, sample, tokens)]
                         for sample in range(batch)])
    full = hidden.new_zeros(batch, tokens, channels).scatter(1, rows[..., None].expand(-1, -1, channels), hidden)
    offset = 1 if config.vision_feature_select_strategy == "default" else 0
    image_mask = vision_token_mask(config, inputs["input_ids"])
    positions = image_positions_of_rows(image_mask, rows.sort(dim=1).values, offset)
    return {0: torch.zeros_like(image_mask).scatter(1, positions, True)}, full[:, offset:]


def _replayed_sources(steps: list, sample: int, tokens: int) -> list[set]:
    """The patch rows each token of `sample` stands for after the recorded ToMe and TopK selections."""
    sources = [{row} for row in range(tokens)]
    for kind, protected, *selection in steps:
        prefix, rest = sources[:protected], sources[protected:]
        if kind == "tome":
            src, dst, unmerged = (index[sample, :, 0].tolist() for index in selection)
            a, b = rest[::2], [set(token) for token in rest[1::2]]
            for i, j in zip(src, dst):
                b[j] |= a[i]
            sources = prefix + [a[i] for i in unmerged] + b
        else:
            kept, fuse = selection[0][sample].tolist(), selection[1]
            dropped = set().union(*(rest[i] for i in range(len(rest)) if i not in kept))
            sources = prefix + [rest[i] for i in kept] + ([dropped] if fuse else [])
    return sources


@contextlib.contextmanager
def _replacing_projector_input(model, replacement):
    """A forward pre-hook that hands the projector `replacement` instead of its input (None: no hook)."""
    if replacement is None:
        yield
        return
    projector = getattr(model, "model", model).multi_modal_projector
    handle = projector.register_forward_pre_hook(lambda module, args: (replacement,) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def fastv_masked_forward(model, inputs: dict, layer: int, keep: float, query: str = "last") -> dict:
    """FastV at decoder layer `layer` by masking: {"logits": [B, S, V], "kept": [B, S'] positions}."""
    from tokensparse.policies import FastV

    return masked_forward(model, inputs, FastV(layer=layer, keep=keep, query=query))


def _image_mask(model, inputs, policy) -> torch.Tensor:
    if policy.vision_span is not None:
        mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        mask[:, policy.vision_span[0]:policy.vision_span[1]] = True
        return mask
    return vision_token_mask(model.config, inputs["input_ids"])


def _choose(model, inputs, layers, stage: Stage, image_mask, survivors, columns, rotary=None) -> torch.Tensor:
    """The positions surviving `stage` ([B, S] bool), chosen among the surviving image tokens."""
    images = image_mask & survivors
    if stage.score == "none":
        return survivors & ~image_mask
    if stage.score == "temporal":
        return _changed_video_tokens(model, inputs, layers, stage, image_mask, survivors, columns, rotary)
    if stage.score == "previous_attention":
        scores = _attention_received(model, inputs, layers, stage, images, columns, rotary)
    elif stage.score == "next_projection":
        scores = _next_layer_scores(model, inputs, layers, stage.layer, survivors, columns, rotary)
    else:
        return _diverse(model, inputs, layers, stage, images, survivors, columns, rotary)
    count = kept_image_count(int(images[0].sum()), stage.keep)
    ranked = scores.float().masked_fill(~images, -math.inf).sort(dim=-1, descending=True, stable=True).indices
    return (survivors & ~image_mask).scatter(1, ranked[:, :count], True)


def _attention_received(model, inputs, layers, stage, images, columns, rotary=None) -> torch.Tensor:
    """FastV: layer K-1's eager attention weights, from the last row (mean over heads) or all text rows."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), _masking(layers, columns, rotary):
            probabilities = model(**inputs, output_attentions=True).attentions[stage.layer - 1].float()
    finally:
        model.set_attn_implementation(previous)
    if stage.query == "last":
        return probabilities[:, :, -1].mean(dim=1)
    survivors = _surviving(columns, stage.layer - 1, images.shape) & _not_padding(inputs, images)
    return text_row_mean(probabilities, ~(survivors & ~images))    # rows: the surviving text tokens


def _next_layer_scores(model, inputs, layers, index, survivors, columns, rotary=None) -> torch.Tensor:
    """PyramidDrop: the last token's query through layer `index`'s input norm, q/k projections and RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured = _layer_inputs(model, inputs, layers, index, columns, rotary)
    layer = layers[index]
    attention = layer.self_attn
    hidden = layer.input_layernorm(captured["hidden"])
    batch, sequence, _ = hidden.shape
    d = attention.head_dim
    q = attention.q_proj(hidden).view(batch, sequence, -1, d).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, sequence, -1, d).transpose(1, 2)
    cos, sin = captured["position_embeddings"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:] @ k.transpose(-1, -2) * attention.scaling)[:, :, 0]           # [B, H, S]
    logits = logits.masked_fill(~(survivors & _not_padding(inputs, survivors))[:, None], -math.inf)
    return logits.softmax(dim=-1).mean(dim=1)


def _not_padding(inputs, like: torch.Tensor) -> torch.Tensor:
    """[B, S] True at the prompt's real (unpadded) positions."""
    mask = inputs.get("attention_mask")
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask.bool()


def _diverse(model, inputs, layers, stage, images, survivors, columns, rotary=None) -> torch.Tensor:
    """DivPrune on the features entering layer `stage.layer` at the surviving image positions."""
    hidden = _layer_inputs(model, inputs, layers, stage.layer, columns, rotary)["hidden"]
    batch, _, channels = hidden.shape
    where = images.nonzero()[:, 1].view(batch, -1)
    chosen = divprune_select(hidden.gather(1, where[..., None].expand(-1, -1, channels)),
                             kept_image_count(where.shape[1], stage.keep))
    return (survivors & ~images).scatter(1, where.gather(1, chosen), True)


def _changed_video_tokens(model, inputs, layers, stage, image_mask, survivors, columns, rotary=None) -> torch.Tensor:
    """DTD from the features entering layer 0, each video's frames laid out by its `video_grid_thw` row (the
    same patch of the previous frame is the token one frame earlier): a token is dropped when its cosine
    similarity to that one exceeds tau. Samples that keep fewer than the most-keeping one also keep their
    least similar dropped tokens."""
    hidden = _layer_inputs(model, inputs, layers, stage.layer, columns, rotary)["hidden"].float()
    video = inputs["input_ids"] == model.config.video_token_id
    merge = model.config.vision_config.spatial_merge_size
    grids = iter(inputs["video_grid_thw"].tolist())
    similarity = torch.full(video.shape, -math.inf)
    for sample in range(video.shape[0]):
        where = video[sample].nonzero()[:, 0].tolist()
        while where:
            frames, height, width = next(grids)
            per_frame = height * width // merge ** 2
            tokens, where = where[:frames * per_frame], where[frames * per_frame:]
            for later, earlier in zip(tokens[per_frame:], tokens):
                similarity[sample, later] = torch.cosine_similarity(hidden[sample, later], hidden[sample, earlier], dim=0)
    count = int((video & (similarity <= stage.keep)).sum(dim=1).max())
    kept = survivors & ~image_mask
    for sample in range(video.shape[0]):
        ranked = similarity[sample].masked_fill(~image_mask[sample], math.inf).sort(stable=True).indices
        kept[sample, ranked[:count + int((image_mask[sample] & ~video[sample]).sum())]] = True
    return kept


def _layer_inputs(model, inputs, layers, index, columns, rotary=None) -> dict:
    """What enters layer `index` (hidden states, RoPE tables) with the earlier stages applied."""
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["position_embeddings"] = kwargs["position_embeddings"]

    with torch.no_grad(), _masking(layers, columns, rotary):
        # registered after the masking hooks: it sees the positions they renumber
        handle = layers[index].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    return captured


def _surviving(columns: dict, layer: int, shape) -> torch.Tensor:
    starts = [start for start in columns if start <= layer]
    return columns[max(starts)] if starts else torch.ones(shape, dtype=torch.bool)


@contextlib.contextmanager
def _masking(layers, columns: dict, rotary=None):
    """Forward pre-hooks: from each stage's layer on, attention sees only the surviving prompt positions
    (and every generated position), causally; a dropped row still sees itself. With `rotary` (positions=
    "compact"), each position's RoPE position there is its rank among the surviving and generated ones."""
    handles = []

    def hook_for(index):
        def use_mask(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            alive = _surviving(columns, index, None)
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length(index) if cache is not None else 0
            own = kwargs.get("attention_mask")
            if own is None:
                kwargs["attention_mask"] = _mask(alive, hidden.shape[1], past, hidden.dtype)
            else:       # a padded batch: the model's mask (causal and padding) and the surviving columns
                allowed = attended(own) & _surviving_columns(alive, past + hidden.shape[1])
                kwargs["attention_mask"] = allowed if own.dtype == torch.bool else \
                    torch.zeros_like(own).masked_fill(~allowed, torch.finfo(own.dtype).min)
            if rotary is not None:
                ranks = _surviving_columns(alive, past + hidden.shape[1])[:, 0, 0].long().cumsum(dim=-1) - 1
                kwargs["position_embeddings"] = rotary(hidden, ranks[:, past:])
            return args, kwargs
        return use_mask

    try:
        for index in range(len(layers)):
            if any(start <= index for start in columns):
                handles.append(layers[index].register_forward_pre_hook(hook_for(index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _surviving_columns(alive: torch.Tensor, total: int) -> torch.Tensor:
    """[B, 1, 1, total]: the surviving prompt positions and every generated one."""
    keys = torch.ones(alive.shape[0], total, dtype=torch.bool, device=alive.device)
    keys[:, :min(alive.shape[1], total)] = alive[:, :total]
    return keys[:, None, None, :]


def _mask(alive: torch.Tensor, queries: int, past: int, dtype) -> torch.Tensor:
    """Additive [B, 1, queries, past + queries]: causal, keys limited to the surviving prompt positions."""
    batch, prompt = alive.shape
    total = past + queries
    keys = torch.ones(batch, total, dtype=torch.bool, device=alive.device)
    keys[:, :min(prompt, total)] = alive[:, :total]
    rows = torch.arange(past, total, device=alive.device)[:, None]
    columns = torch.arange(total, device=alive.device)[None, :]
    allowed = (columns <= rows)[None, None] & keys[:, None, None, :]
    allowed |= (columns == rows)[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=alive.device).masked_fill(~allowed, -math.inf)
