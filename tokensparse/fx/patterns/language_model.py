"""The language model of a vision-language graph: its decoder layers (the repeated block list that reads
the merged embeddings), each layer's attention, and where the vision tokens sit in the sequence."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tokensparse.fx.patterns.attention import AttentionSite, find_attention_sites
from tokensparse.fx.patterns.blocks import block_path
from tokensparse.fx.patterns.graph import downstream, is_op, module_paths, shape_of
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.vision_span import VisionSpan, find_vision_span

_INDEXED = re.compile(r"^(?P<list>.+)\.(?P<index>\d+)$")


@dataclass
class DecoderLayer:
    index: int
    path: str
    site: AttentionSite
    nodes: set = field(default_factory=set, repr=False)     # computation nodes (no placeholders)


@dataclass
class LanguageModelMatch:
    layers: list[DecoderLayer]
    list_path: str
    sequence: int                      # S, the prompt length seen while tracing
    span: Optional[VisionSpan]         # the masked_scatter merge, when found
    image_mask: Optional[fx.Node]      # [B, S] or [B, S, 1] bool from the merge (None with an explicit span)
    returns_cache: bool = True         # the graph outputs tensors made inside decoder layers (its KV cache)
    notes: list = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.layers)


def has_image_input(gm: fx.GraphModule) -> bool:
    """Whether the graph reads an image: a convolution (patch embedding) or an input named for pixels,
    images or video. Decode steps and text-only prompts of a VLM read none."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and any(word in node.name.lower() for word in ("pixel", "image", "video")):
            return True
        if is_op(node, "conv2d", "conv3d", "convolution", "_convolution"):
            return True
    return False


def match_language_model(gm: fx.GraphModule, vision_span: Optional[tuple] = None) -> LanguageModelMatch:
    """Decoder layers and the vision span of a VLM graph; MatchFailure says why not."""
    span = find_vision_span(gm) if vision_span is None else None
    sites, notes = find_attention_sites(gm)
    lists: dict[str, list[tuple[str, AttentionSite]]] = {}
    for site in sites:
        path = block_path(site)
        if path is not None:
            lists.setdefault(_INDEXED.match(path).group("list"), []).append((path, site))
    if span is not None:
        after = downstream([span.merge])
        candidates = [name for name, entries in lists.items() if entries[0][1].q in after]
    else:
        candidates = list(lists)[-1:]
    if not candidates and span is not None and not any(site.q in after for site in sites):
        raise MatchFailure("no decoder layers in the graph of the image merge: no attention reads the merged "
                           "embeddings in it, so a graph break splits them off (Qwen3-VL's deepstack step, which "
                           "indexes the hidden states with a boolean mask in the first decoder layers, makes one; "
                           "torch._dynamo.explain(model)(**inputs) lists the breaks)")
    if not candidates:
        raise MatchFailure("no decoder layers: no repeated block of attention reads the merged embeddings")
    list_path = candidates[0]
    layers = _layers(gm, list_path, lists[list_path])
    q_shape = shape_of(layers[0].site.q)
    if q_shape is None or len(q_shape) != 4:
        raise MatchFailure(f"{layers[0].path}: its attention query is not [B, H, S, d]")
    sequence = q_shape[2]
    if span is not None and span.sequence != sequence:
        raise MatchFailure(f"the vision span is merged into {span.sequence} positions but {layers[0].path} attends "
                           f"over {sequence}")
    if vision_span is not None and vision_span[1] > sequence:
        raise ValueError(f"vision_span={vision_span} is outside the sequence: the prompt has {sequence} positions")
    notes += [f"block list {name}: not the language model, left unchanged" for name in lists if name != list_path]
    return LanguageModelMatch(layers, list_path, sequence, span, span.mask if span else None,
                              _returns_layer_tensors(gm, layers), notes)


def _returns_layer_tensors(gm: fx.GraphModule, layers: list[DecoderLayer]) -> bool:
    """Whether a graph output is made inside a decoder layer: its KV cache (or per-layer hidden states), which
    later decode steps read. A prefill-only graph (use_cache=False, an export of the logits) returns none."""
    inside = set().union(*(layer.nodes for layer in layers))
    return any(node in inside for node in gm.graph.find_nodes(op="output")[0].all_input_nodes)


def _layers(gm: fx.GraphModule, list_path: str, entries: list) -> list[DecoderLayer]:
    by_path: dict[str, list[AttentionSite]] = {}
    for path, site in entries:
        by_path.setdefault(path, []).append(site)
    nodes: dict[str, set] = {path: set() for path in by_path}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        for path in module_paths(node):
            if path in nodes:
                nodes[path].add(node)
                break
    layers = []
    for index, path in enumerate(by_path):
        if len(by_path[path]) != 1:
            raise MatchFailure(f"decoder layer {path} holds {len(by_path[path])} attentions; one was expected")
        if int(_INDEXED.match(path).group("index")) != index:
            raise MatchFailure(f"decoder layers of {list_path} are not traced in order (found {path} as layer {index})")
        layers.append(DecoderLayer(index, path, by_path[path][0], nodes[path]))
    return layers
