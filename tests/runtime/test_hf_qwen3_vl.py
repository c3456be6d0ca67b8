"""Qwen3-VL: its deepstack step (a boolean-mask index of the hidden states in the first decoder layers) splits
the decoder layers off the image merge's graph. Not pruned yet: the warning says so and why, and generate()
equals the unmodified model's."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle
from tests.models import build_qwen3_vl


def test_fastv_is_refused_with_the_graph_break_named():
    model, inputs = build_qwen3_vl()
    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.FastV(layer=2, keep=0.25), inductor=False))
    settings = dict(max_new_tokens=3, **LOGGED)
    with pytest.warns(tokensparse.TokensparseWarning, match="no decoder layers in the graph of the image merge: .*"
                                                            "Qwen3-VL's deepstack step"):
        with torch.no_grad():
            out = fast.generate(**inputs, **settings)
    with torch.no_grad():
        want = model.generate(**inputs, **settings)
    assert_equals_oracle(out, want)
