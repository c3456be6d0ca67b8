"""Llama4 (chunked attention, MoE decoder layers, pixel-shuffle connector) under tokensparse.compile: keep=1.0
equals the unmodified model; a language-model policy falls back with the reason (the chunked-attention mask is
made for the unpruned tokens) and generate() equals the unmodified model's; a KV policy is refused by the name of
what it does not support (chunked attention) before anything runs."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, assert_keep_all_equals_the_model
from tests.models import build_llama4

SETTINGS = dict(max_new_tokens=4, **LOGGED)


@pytest.fixture(scope="module")
def llama4():
    return build_llama4()


def test_a_language_model_policy_falls_back_with_the_reason(llama4):
    """The MoE layers' flattened [B*N, D] tokens are viewed back at the pruned count; the chunked-attention mask,
    built for the whole prompt before the layers, is what stops the rewrite (not silently: said, unpruned)."""
    model, inputs = llama4
    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.FastV(layer=2, keep=0.5), inductor=False))
    with pytest.warns(tokensparse.TokensparseWarning, match="a tensor sized for the original tokens"):
        with torch.no_grad():
            out = fast.generate(**inputs, **SETTINGS)
    with torch.no_grad():
        want = model.generate(**inputs, **SETTINGS)
    assert_equals_oracle(out, want)


def test_keep_all_equals_the_unmodified_model(llama4):
    assert_keep_all_equals_the_model(*llama4, **SETTINGS)


def test_a_kv_policy_is_refused_by_the_name_of_chunked_attention(llama4):
    model, _ = llama4
    with pytest.raises(ValueError, match=r"kv=snapkv: decoder layers \[0, 1, 2\] use chunked attention "
                                         r"\(attention_chunk_size=16, as in Llama4\)"):
        tokensparse.compile(model, tokensparse.Config(kv=tokensparse.SnapKV(budget=8, window=4)))
