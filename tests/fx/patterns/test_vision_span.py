"""The vision span of a LLaVA graph: the masked_scatter merge of image features into the embeddings."""

import pytest
import torch

from tests.models import build, build_llava
from tokensparse.capture import capture_graphs
from tokensparse.pipeline import MatchFailure
from tokensparse.fx.patterns.vision_span import find_vision_span


def test_llava_forward_is_one_graph_with_one_vision_span():
    model, inputs = build_llava(image_tokens=16, prompt=(3, 5))
    with torch.no_grad():
        model(**inputs)        # transformers installs its output hooks on the first call
    [(gm, _)] = capture_graphs(model, **inputs)
    span = find_vision_span(gm)
    assert span.sequence == 3 + 16 + 5
    assert tuple(span.features.meta["example_value"].shape)[-1] == 64


def test_a_vision_encoder_has_no_vision_span():
    model, pixels = build("timm_vit", depth=2)
    [(gm, _)] = capture_graphs(model, pixels)
    with pytest.raises(MatchFailure, match="no vision span"):
        find_vision_span(gm)


class _TwoMerges(torch.nn.Module):
    """Images, then video, merged into the embeddings (chained, as Qwen2-VL does), or both into the text
    embeddings (not a chain: which one does the language model read?)."""

    def __init__(self, chained: bool):
        super().__init__()
        self.chained = chained

    def forward(self, embeddings, image_mask, images, video_mask, video):
        merged = embeddings.masked_scatter(image_mask, images)
        both = (merged if self.chained else embeddings).masked_scatter(video_mask, video)
        return merged + both


def _two_merge_graph(chained: bool):
    embeddings = torch.randn(2, 6, 4)
    image_mask = torch.zeros(2, 6, 1, dtype=torch.bool)
    image_mask[:, 1] = True
    video_mask = torch.zeros(2, 6, 1, dtype=torch.bool)
    video_mask[:, 3:5] = True
    inputs = (embeddings, image_mask.expand(-1, -1, 4), torch.randn(2, 4), video_mask.expand(-1, -1, 4),
              torch.randn(4, 4))
    [(gm, _)] = capture_graphs(_TwoMerges(chained), *inputs)
    return gm


def test_chained_image_and_video_merges_are_one_span_with_both_masks():
    gm = _two_merge_graph(chained=True)
    span = find_vision_span(gm)
    merges = [node for node in gm.graph.nodes if node.target == "masked_scatter"]
    assert span.merge is merges[1] and span.masks == (merges[0].args[1], merges[1].args[1])


def test_merges_that_are_not_a_chain_are_refused_with_the_reason():
    with pytest.raises(MatchFailure, match="2 masked_scatter merges .* not one chain"):
        find_vision_span(_two_merge_graph(chained=False))
