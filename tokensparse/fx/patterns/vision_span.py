"""The vision span of a vision-language model's graph: where image features are merged into the text
embeddings (inputs_embeds.masked_scatter(image_mask, features), as Hugging Face LLaVA-style models do; a
prompt with images and video, as Qwen2-VL's, chains one merge per modality)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from tokensparse.fx.patterns.graph import downstream, op_name, shape_of
from tokensparse.pipeline import MatchFailure


@dataclass
class VisionSpan:
    merge: fx.Node          # the (last) masked_scatter node: its output is the embeddings the language model reads
    embeddings: fx.Node     # text embeddings [B, S, D] before the merge
    mask: fx.Node           # where the image tokens are ([B, S] or [B, S, D] bool)
    features: fx.Node       # the projected image features
    sequence: int           # S, the sequence length seen while tracing
    masks: tuple = field(default=())    # every chained merge's mask (images, then video): the vision tokens

    def __post_init__(self):
        self.masks = self.masks or (self.mask,)


def find_vision_span(gm: fx.GraphModule) -> VisionSpan:
    """The one masked_scatter of image features into [B, S, D] embeddings; MatchFailure says why not."""
    merges = [node for node in gm.graph.nodes if op_name(node) == "masked_scatter"]
    if not merges:
        raise MatchFailure("no vision span: the graph has no masked_scatter of image features into the "
                           "embeddings (give vision_span= explicitly)")
    candidates = []
    for node in merges:
        embeddings, mask, features = node.args[:3]
        shape = shape_of(node)
        if shape is not None and len(shape) == 3:
            candidates.append(VisionSpan(node, embeddings, mask, features, shape[1]))
    if len(candidates) > 1 and _chained(candidates):
        last = candidates[-1]
        return VisionSpan(last.merge, candidates[0].embeddings, last.mask, last.features, last.sequence,
                          tuple(span.mask for span in candidates))
    if len(candidates) != 1:
        raise MatchFailure(f"found {len(candidates)} masked_scatter merges into [B, S, D] embeddings, not one chain "
                           f"of merges (give vision_span= explicitly)")
    return candidates[0]


def _chained(spans: list[VisionSpan]) -> bool:
    """Whether each merge writes into the embeddings that the one before it produced (images, then video)."""
    return all(later.embeddings in {earlier.merge} | downstream([earlier.merge]) and later.sequence == earlier.sequence
               for earlier, later in zip(spans, spans[1:]))
