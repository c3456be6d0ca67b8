"""A vision policy before a connector that lays the image rows out as a grid (Gemma3's average pooling,
Idefics3's pixel shuffle) is refused with the connector's name: each image token is made from several rows.
generate() then runs the unmodified model."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle
from tests.models import build_gemma3, build_idefics3

CONNECTORS = {"gemma3": (build_gemma3, r"model.multi_modal_projector lays the image rows out as a grid "
                                       r"\(reshaped_vision_outputs_\d+: \[2, 32, 8, 8\]\)"),
              # its tower is a graph of its own: the grid view is met there, after the tower's blocks
              "idefics3": (build_idefics3, r"connector lays the tokens out as a grid \(x: \[2, 64, 32\] -> "
                                           r"\[2, 8, 8, 32\]\)")}


@pytest.mark.parametrize("family", sorted(CONNECTORS))
def test_tome_before_a_grid_connector_is_refused_by_name(family):
    build, reason = CONNECTORS[family]
    model, inputs = build()
    fast = tokensparse.compile(model, tokensparse.Config(vision=tokensparse.ToMe(r=2), inductor=False))
    settings = dict(max_new_tokens=3, **LOGGED)
    with pytest.warns(tokensparse.TokensparseWarning, match=reason):
        with torch.no_grad():
            out = fast.generate(**inputs, **settings)
    with torch.no_grad():
        want = model.generate(**inputs, **settings)
    assert_equals_oracle(out, want)
