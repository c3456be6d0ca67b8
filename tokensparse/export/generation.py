"""tokensparse.export.to_onnx_generation: a generative Hugging Face model as two ONNX graphs that carry its KV
cache, so that ONNX Runtime or a C++ serving loop generates from the pruned cache:

  prefill.onnx  input_ids [B, S], attention_mask [B, S], the image inputs (pixel_values, ...)
                -> logits [B, 1, V] (the last position), present.{i}.key / present.{i}.value [B, H_kv, L_i, d]
  decode.onnx   input_ids [B, 1], attention_mask [B, T], past_key_values.{i}.key / .value [B, H_kv, L_i, d]
                -> logits [B, 1, V], present.{i}.key / present.{i}.value [B, H_kv, L_i + 1, d]

The prefill holds the policy (the same passes as tokensparse.compile), so each layer's cache is as long as what
that layer kept: L_i differs between layers. `attention_mask` always spans the prompt as given plus the tokens
generated so far (left padding), as generate() keeps it; positions follow generate()'s rule (the running count
of unmasked positions), and the decode graph gives each layer the mask of its own cache. KV eviction after
every step (StreamingLLM, H2O) keeps L_i at most the budget (fixed, without a language-model policy); H2O also
carries present.{i}.scores [B, H_kv, L_i] (float32). A sliding-window model's graphs hold full layers. With a KV
policy they also carry present.{i}.positions [B, H_kv, L_i] (int64: the position each entry came from, padding
counted), by which each sliding-window layer's attention sees its window, and such a layer keeps the last
window - 1 of its entries (fx/passes/sliding_positions.py). Without a KV policy, or with a language-model policy,
they are its model only while every position fits the window (prefill.onnx metadata tokensparse.max_positions).
A language-model policy with a KV policy also carries present.{i}.entered (a 0-d int64: the positions that ever
entered layer i, which a padded batch's masks need; runtime/counted_cache.py)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from tokensparse.config import CallerFacts, Config, config_from_options
from tokensparse.export.onnx import DEFAULT_OPSET, OnnxExport, _export, export_pruned, prompt_lengths
from tokensparse.export.lowering import DECOMPOSITIONS
from tokensparse.policies.fastv import additive
from tokensparse.policies.kv_policy import evict_positions
from tokensparse.runtime.counted_cache import held_padding
from tokensparse.fx.passes.evict_kv import last_entries
from tokensparse.fx.passes.sliding_positions import window_allowed
from tokensparse.runtime.hf_model import is_generative
from tokensparse.runtime.model_copy import hook_decoder_layers, own_copy
from tokensparse.runtime.sliding_window import layer_windows

PREFILL_FILE, DECODE_FILE = "prefill.onnx", "decode.onnx"
PROMPT_LENGTHS_KEY = "tokensparse.prompt_lengths"    # prefill.onnx metadata: "shortest longest" (or "shortest")
MAX_POSITIONS_KEY = "tokensparse.max_positions"      # prefill.onnx metadata: a sliding-window model's window
# evict in the prefill; streamingllm and h2o also after every decode step
EXPORTED_KV_POLICIES = ("snapkv", "key_norm", "streamingllm", "h2o", "adaptive", "vision_budget")


@dataclass
class OnnxGeneration:
    """What to_onnx_generation wrote: the two graphs, and which decoder layers share a cache length."""

    directory: str
    prefill: OnnxExport
    decode: OnnxExport
    length_groups: list = field(default_factory=list)   # lists of layer indices whose caches have one length
    prompt_lengths: tuple = (2, None)                    # the prefill's shortest and longest prompt (None: any)
    max_positions: Optional[int] = None                  # prompt + new tokens - 1 at most (a sliding window)


def cache_tensors(cache) -> list[torch.Tensor]:
    """A DynamicCache as [key_0, value_0, key_1, value_1, ...]; a ScoredCache as [key_0, value_0, scores_0, ...];
    a PositionedCache with positions_i after them; a counting cache with entered_i after each layer's tensors."""
    return [tensor for layer in cache.layers
            for tensor in (layer.keys, layer.values, getattr(layer, "scores", None),
                           getattr(layer, "positions", None), getattr(layer, "entered", None))
            if tensor is not None]


def cache_parts(scored: bool, counted: bool, positioned: bool = False) -> tuple[str, ...]:
    """The names of each layer's cache tensors, in cache_tensors' order."""
    return (("key", "value") + (("scores",) if scored else ()) + (("positions",) if positioned else ())
            + (("entered",) if counted else ()))


def split_by_layer(tensors, parts: tuple[str, ...]) -> list[dict]:
    """The flat cache tensors (cache_tensors' layout) as one {part: tensor} per layer."""
    return [dict(zip(parts, tensors[start:start + len(parts)])) for start in range(0, len(tensors), len(parts))]


def empty_cache(scored: bool, counted: bool = False, positioned: bool = False):
    """The cache a prefill fills: a ScoredCache for a policy that accumulates scores (H2O), a counting one after a
    language-model policy, a PositionedCache for a KV policy on a sliding-window model. Its layers are full ones, a
    sliding-window model's too (_check_model)."""
    from transformers import DynamicCache

    from tokensparse.runtime.counted_cache import CountedCache, CountedScoredCache
    from tokensparse.runtime.positioned_cache import PositionedCache, PositionedScoredCache
    from tokensparse.runtime.scored_cache import ScoredCache

    if positioned:
        return PositionedScoredCache() if scored else PositionedCache()
    if counted:
        return CountedScoredCache() if scored else CountedCache()
    return ScoredCache() if scored else DynamicCache()


def filled_cache(past, scored: bool, counted: bool = False, seen: Optional[torch.Tensor] = None):
    """A decode step's cache from the flat past tensors (cache_tensors' layout); `seen` (0-d int64, the new token's
    position) for a PositionedCache's, whose past tensors carry positions."""
    from transformers import DynamicCache

    from tokensparse.runtime.counted_cache import CountedLayer, CountedScoredLayer
    from tokensparse.runtime.positioned_cache import PositionedLayer, PositionedScoredLayer
    from tokensparse.runtime.scored_cache import ScoredLayer

    positioned = seen is not None
    if not scored and not counted and not positioned:
        return DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
    cache = empty_cache(scored, counted, positioned)
    cache.layers = []
    kind = {(True, False, False): ScoredLayer, (False, True, False): CountedLayer,
            (True, True, False): CountedScoredLayer, (False, False, True): PositionedLayer,
            (True, False, True): PositionedScoredLayer}[scored, counted, positioned]
    for tensors in split_by_layer(past, cache_parts(scored, counted, positioned)):
        layer = kind()
        layer.dtype, layer.device, layer.is_initialized = tensors["key"].dtype, tensors["key"].device, True
        layer.keys, layer.values = tensors["key"], tensors["value"]
        layer.scores, layer.entered = tensors.get("scores"), tensors.get("entered")
        if positioned:
            layer.positions, layer.seen = tensors["positions"], seen
        cache.layers.append(layer)
    return cache


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """generate()'s position ids for a left-padded prompt: each position's count of unmasked positions up to it,
    minus one; 0 for the padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class PrefillWithCache(torch.nn.Module):
    """The model's prefill, returning (last position's logits, key_0, value_0, ...) of its new KV cache."""

    def __init__(self, model: torch.nn.Module, scored: bool = False, counted: bool = False, positioned: bool = False):
        super().__init__()
        self.model = model
        self.scored, self.counted, self.positioned = scored, counted, positioned

    def forward(self, input_ids, attention_mask, **images):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=prompt_positions(attention_mask),
                            past_key_values=empty_cache(self.scored, self.counted, self.positioned), use_cache=True,
                            logits_to_keep=1, **images)
        return (output.logits, *cache_tensors(output.past_key_values))


class DecodeStep(torch.nn.Module):
    """One decode step from per-layer caches of any lengths: (logits, key_0, value_0, ...) of the grown cache.
    Each decoder layer (a hooked copy; the model passed in is not changed) masks its own cache's padding,
    computed from the 2-D mask: language-model pruning keeps every padding position, first; KV eviction keeps
    padding only where a layer holds every real position seen, and then as its first positions; after both
    (`counted`), a layer holds max(0, padding - evicted), evicted = its entered count - what it holds.
    `windows`: each layer's sliding window (0: full) for a PositionedCache, whose layers carry their positions:
    a sliding-window layer then sees the window by position, and keeps the last window - 1 of its entries (H2O's
    rewritten step does both in the graph, fx/passes/sliding_positions.py and fx/passes/evict_kv.py)."""

    def __init__(self, model: torch.nn.Module, evicted: bool, streaming=None, scored: bool = False,
                 counted: bool = False, windows: tuple = ()):
        super().__init__()
        self.model = own_copy(model)
        self.scored, self.counted, self.windows = scored, counted, tuple(windows)
        self.streaming = streaming        # a policy with step_keep (StreamingLLM): evicts after every step
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._group = text.num_attention_heads // getattr(text, "num_key_value_heads", text.num_attention_heads)
        self._real = {}                   # the running forward's count of real positions per sample (incl. this one)
        if not hook_decoder_layers(self.model, functools.partial(self._padding_mask, evicted)):
            raise ValueError(f"{type(model).__name__} does not expose its decoder layers (get_decoder().layers): "
                             f"its decode step cannot mask caches of different lengths")

    def _padding_mask(self, evicted: bool, index: int, module, args, kwargs):
        hidden, cache = args[0] if args else kwargs["hidden_states"], kwargs["past_key_values"]
        held = cache.get_seq_length(index)
        keys = held + hidden.shape[1]
        real, total = self._real["count"], self._real["total"]
        if self.counted:
            first_real = held_padding(total - real, cache.layers[index].entered, held)
        else:
            first_real = keys - real if evicted else total - real
        allowed = (torch.arange(keys, device=hidden.device)[None, :] >= first_real[:, None])[:, None, None, :]
        window = self.windows[index] if self.windows and not self.scored else 0
        if window:                      # the step's window over the held positions and its own
            layer = cache.layers[index]
            positions = torch.cat([layer.positions, layer.seen.expand(*layer.positions.shape[:2], 1)], dim=-1)
            allowed = allowed & window_allowed(positions, 1, window).repeat_interleave(self._group, dim=1)
        return args, {**kwargs, "attention_mask": additive(allowed, hidden.dtype)}

    def forward(self, input_ids, attention_mask, *past):
        seen = torch.ones_like(attention_mask[0]).sum() - 1 if self.windows else None   # the new token's position
        cache = filled_cache(past, self.scored, self.counted, seen)
        self._real.update(count=attention_mask.long().sum(-1), total=attention_mask.shape[-1])
        try:
            output = self.model(input_ids=input_ids, attention_mask=None, past_key_values=cache, use_cache=True,
                                position_ids=self._real["count"][:, None] - 1)
        finally:
            real = self._real.pop("count")
            self._real.clear()
        tensors = cache_tensors(output.past_key_values)
        if self.streaming is not None:
            tensors = self._keep_sinks_and_window(tensors, real, attention_mask.shape[-1])
        if self.windows and not self.scored:
            tensors = self._last_of_each_window(tensors)
        return (output.logits, *tensors)

    def _parts(self) -> tuple[str, ...]:
        return cache_parts(self.scored, self.counted, bool(self.windows))

    def _last_of_each_window(self, tensors: list) -> list:
        """Each sliding-window layer's tensors cut to their last window - 1 entries (the rest left the window of
        every later query), as tokensparse.compile's evict pass does."""
        kept = []
        for layer, window in zip(split_by_layer(tensors, self._parts()), self.windows):
            kept += [last_entries(tensor, window - 1) if window else tensor for tensor in layer.values()]
        return kept

    def _keep_sinks_and_window(self, tensors: list, real: torch.Tensor, total) -> list:
        """StreamingLLM after the step's attention: each layer's cache back to min(its length, sinks + window)
        positions (the prefill left sinks + window, or after a language-model policy possibly fewer), padding
        (a layer's first positions where a sample has fewer real ones; after both policies, held_padding)
        ranked last, as tokensparse.compile's decode steps do."""
        evicted = []
        for layer in split_by_layer(tensors, self._parts()):
            keys, values = layer["key"], layer["value"]
            length = keys.shape[2]
            first_real = held_padding(total - real, layer["entered"], length) if self.counted else length - real
            kept = self.streaming.step_keep(length, first_real)
            kept = kept[:, None, :].expand(-1, keys.shape[1], -1)
            positions = [layer["positions"].gather(2, kept)] if "positions" in layer else []
            evicted += [*evict_positions(keys, values, kept), *positions,
                        *([layer["entered"]] if self.counted else [])]
        return evicted


def to_onnx_generation(model: torch.nn.Module, example_inputs: dict, config, directory: str, dynamic: bool = False,
                       opset: int = DEFAULT_OPSET) -> OnnxGeneration:
    """Export `model` (a Hugging Face model with generate()) with `config` as directory/prefill.onnx and
    directory/decode.onnx (module docstring). `example_inputs` holds input_ids, attention_mask (optional) and
    the image inputs; `dynamic` makes the prefill's batch axis dynamic (LLaVA fixes it while traced); the
    decode graph's batch and cache lengths are always dynamic."""
    from tokensparse.export.translations import TRANSLATIONS

    if not is_generative(model):
        raise TypeError(f"{type(model).__name__} has no generate(): to_onnx_generation exports a generative "
                        f"Hugging Face model's prefill and decode step; use to_onnx for other models")
    if not isinstance(example_inputs, dict) or "input_ids" not in example_inputs:
        raise TypeError("example_inputs must be a dict of keyword inputs with input_ids (and the image inputs)")
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset={opset!r} is out of range: torch.onnx's exporter needs opset >= 18")
    config = Config() if config is None else config_from_options(config)
    _check_supported(config)
    window = _check_model(model)
    prunes = config.llm is not None or config.vision is not None
    positioned = window is not None and config.kv is not None and not prunes     # sliding windows by position
    windows = layer_windows(model, window) if positioned else ()
    not_tensors = [name for name, value in example_inputs.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"example_inputs {not_tensors} are not tensors: give only the model's input tensors (the "
                        f"export sets use_cache and logits_to_keep itself)")
    inputs = dict(example_inputs)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    inputs = {"input_ids": inputs.pop("input_ids"), "attention_mask": inputs.pop("attention_mask"), **inputs}
    facts = CallerFacts(decode_masks_follow_cache=prunes, kv_masks_follow_cache=config.kv is not None,
                        sliding_windows=windows)
    scored = config.kv is not None and config.kv.scored
    counted = prunes and config.kv is not None
    prefill_program, result = export_pruned(PrefillWithCache(model, scored, counted, positioned).eval(), inputs,
                                            config, dynamic, facts=facts,
                                            shortest_prompt=_shortest_prompt(config, inputs["input_ids"].shape[1]))
    parts = cache_parts(scored, counted, positioned)
    layers = (prefill_program.call_spec.out_spec.num_leaves - 1) // len(parts)
    cache_names = [f"present.{index}.{part}" for index in range(layers) for part in parts]
    groups = length_groups(prefill_program, len(parts))
    # a policy that evicts after every step without scores (StreamingLLM): the decode graph calls its step_keep
    streaming = config.kv if config.kv is not None and config.kv.evicts_each_step and not scored else None
    step = DecodeStep(model, evicted=config.kv is not None, streaming=streaming, scored=scored, counted=counted,
                      windows=windows).eval()
    decode_args, decode_shapes = _decode_example(prefill_program, inputs, groups, parts,
                                                 fixed_lengths=(streaming is not None or scored) and not counted)
    if scored:      # H2O: the step's attention row accumulates into the scores, then the cache evicts
        decode_program, decoded = export_pruned(step, decode_args, config, dynamic=False, facts=facts,
                                                dynamic_shapes=decode_shapes)
        if not decoded.changed:
            raise ValueError(f"kv={config.kv.name}'s decode step could not be rewritten ({decoded.reason})")
    else:
        decode_program = _export(step, decode_args, {}, decode_shapes).run_decompositions(DECOMPOSITIONS)
    os.makedirs(directory, exist_ok=True)           # only once both graphs exported
    prompts = prompt_lengths(prefill_program) or (inputs["input_ids"].shape[1],) * 2
    metadata = {PROMPT_LENGTHS_KEY: f"{prompts[0]} {'' if prompts[1] is None else prompts[1]}".strip()}
    max_positions = None if positioned else window
    if max_positions is not None:
        metadata[MAX_POSITIONS_KEY] = str(max_positions)
    prefill = _save(prefill_program, (), inputs, list(inputs), ["logits", *cache_names],
                    os.path.join(directory, PREFILL_FILE), opset, TRANSLATIONS, result, metadata)
    past_names = [name.replace("present", "past_key_values") for name in cache_names]
    decode = _save(decode_program, decode_args, {}, ["input_ids", "attention_mask", *past_names],
                   ["logits", *cache_names], os.path.join(directory, DECODE_FILE), opset, TRANSLATIONS, None)
    return OnnxGeneration(directory, prefill, decode, groups, prompts, max_positions)


def _check_supported(config: Config) -> None:
    """What the two-graph export does not carry yet, named."""
    if config.kv is not None and config.kv.name not in EXPORTED_KV_POLICIES:
        raise ValueError(f"kv={config.kv.name} has no ONNX form in the generation export yet: it takes kv= "
                         f"{', '.join(EXPORTED_KV_POLICIES)}")
    if config.kv is not None and config.kv.at_cache_positions:
        raise ValueError("kv=streamingllm(positions='cache') has no ONNX form in the generation export yet (its "
                         "decode graph would store keys before RoPE and take positions within the cache): export "
                         "positions='original'")


def _check_model(model) -> Optional[int]:
    """Models whose positions or caches the two graphs do not reproduce yet, named; else the window of a
    sliding-window model (its graphs hold full layers: with a KV policy alone they carry positions, else they are
    its model only while every position fits the window, prefill.onnx's tokensparse.max_positions), or None."""
    from tokensparse.runtime.hf_model import tower_splits_graph
    from tokensparse.runtime.sliding_window import sliding_window

    if tower_splits_graph(model):
        raise ValueError(f"{type(model).__name__} encodes its images outside forward, by image size (and Qwen2-VL "
                         f"numbers positions in 3-D): its generation pair is not exported yet")
    return sliding_window(model)


def _shortest_prompt(config: Config, traced: int) -> int:
    """The shortest prompt the prefill graph takes: 2, or for a KV budget of a count (its branches on the length
    are what the graph keeps), the first length it evicts from, if the traced prompt is one."""
    policy = config.kv
    budget = None if policy is None else policy.keeps_all_up_to()
    if budget is None:
        return 2
    evicting = budget + 1
    if traced < evicting:
        raise ValueError(f"the example prompt has {traced} tokens, within kv={policy.name}'s budget of {budget}: "
                         f"trace with a prompt longer than the budget (the graph then takes prompts of {evicting} "
                         f"tokens and more)")
    return evicting


def length_groups(prefill_program: torch.export.ExportedProgram, per_layer: int = 2) -> list[list[int]]:
    """Decoder layers grouped by their cache length in the exported prefill (one symbol or number per group):
    the layers before a cut share the prompt's length, those after it the kept count."""
    output = next(iter(prefill_program.graph.find_nodes(op="output")))
    keys = output.args[0][1::per_layer]
    groups: dict[str, list[int]] = {}
    for index, node in enumerate(keys):
        groups.setdefault(str(node.meta["val"].shape[2]), []).append(index)
    return list(groups.values())


def _decode_example(prefill_program, inputs: dict, groups: list[list[int]], parts: tuple = ("key", "value"),
                    fixed_lengths: bool = False):
    """A decode step's example inputs (the exported prefill's own cache and next token, batch >= 2 so that the
    batch axis stays symbolic) and their dynamic shapes: batch, mask length, one length per group of layers
    (`fixed_lengths`: none; every step evicts back to the length the prefill left)."""
    with torch.no_grad():
        outputs = prefill_program.module()(**inputs)
    logits, past = outputs[0], list(outputs[1:])
    token = logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=-1)
    if token.shape[0] == 1:
        token, mask, *past = (x.expand(2, *x.shape[1:]).contiguous() if x.dim() else x for x in (token, mask, *past))
    batch, total = torch.export.Dim("batch", min=1), torch.export.Dim("mask_length", min=1)
    lengths = {}
    for group, layers in enumerate(groups):
        for layer in layers:
            lengths[layer] = torch.export.Dim(f"cache_length_{group}", min=1)
    past_shapes = tuple(None if parts[index % len(parts)] == "entered" else {0: batch} if fixed_lengths
                        else {0: batch, 2: lengths[index // len(parts)]} for index in range(len(past)))
    return (token, mask, *past), ({0: batch}, {0: batch, 1: total}, past_shapes)


def _save(program, args, kwargs, input_names, output_names, path, opset, translations, result,
          metadata=None) -> OnnxExport:
    onnx_program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=opset, optimize=True,
                                     verbose=False, custom_translation_table=translations, input_names=input_names,
                                     output_names=output_names)
    onnx_program.model.metadata_props.update(metadata or {})
    onnx_program.save(path)
    graph = onnx_program.model.graph
    return OnnxExport(path, onnx_program, result is None or result.changed, None if result is None else result.reason,
                      [value.name for value in graph.inputs], [value.name for value in graph.outputs])
