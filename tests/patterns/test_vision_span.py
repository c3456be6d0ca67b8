"""The vision span of a LLaVA graph: the masked_scatter merge of image features into the embeddings."""

import pytest
import torch

from tests.models import build, build_llava
from tokensparse.capture import capture_graphs
from tokensparse.patterns.graph import MatchFailure
from tokensparse.patterns.vision_span import find_vision_span


def test_llava_forward_is_one_graph_with_one_vision_span():
    model, inputs = build_llava(image_tokens=16, prompt=(3, 5))
    with torch.no_grad():
        model(**inputs)        # transformers installs its output hooks on the first call
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        [(gm, _)] = capture_graphs(model, **inputs)
    span = find_vision_span(gm)
    assert span.sequence == 3 + 16 + 5
    assert tuple(span.features.meta["example_value"].shape)[-1] == 64


def test_a_vision_encoder_has_no_vision_span():
    model, pixels = build("timm_vit", depth=2)
    [(gm, _)] = capture_graphs(model, pixels)
    with pytest.raises(MatchFailure, match="no vision span"):
        find_vision_span(gm)
