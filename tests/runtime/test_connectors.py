"""A vision policy before a connector that lays the image tokens out as a grid (Gemma3's average pooling) is
refused with the connector's name, and generate() runs the unmodified model."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle
from tests.models import build_gemma3


def test_tome_before_gemma3s_pooling_connector_is_refused_by_name():
    model, inputs = build_gemma3()
    fast = tokensparse.compile(model, tokensparse.Config(vision=tokensparse.ToMe(r=2), inductor=False))
    settings = dict(max_new_tokens=3, **LOGGED)
    with pytest.warns(tokensparse.TokensparseWarning, match=r"multi_modal_projector lays the tokens out as a grid "
                                                            r"\(reshaped_vision_outputs_\d+: \[2, 32, 64\] -> "
                                                            r"\[2, 32, 8, 8\]\)"):
        with torch.no_grad():
            out = fast.generate(**inputs, **settings)
    with torch.no_grad():
        want = model.generate(**inputs, **settings)
    assert_equals_oracle(out, want)
