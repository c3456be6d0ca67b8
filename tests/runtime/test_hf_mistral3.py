"""Mistral3 (Pixtral tower, patch merger) under tokensparse.compile: every language-model policy equals the
masking oracle in generate() at batch 1 and 2, keep=1.0 equals the unmodified model, and a KV policy equals
its evicting reference. No global dynamo flag is turned on (capture_scalar_outputs broke its patch merger)."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, assert_keep_all_equals_the_model, generate_without_warnings
from tests.models import build_mistral3
from tokensparse.reference.kv import evicted_generate
from tokensparse.reference.llava import masked_generate

SETTINGS = dict(max_new_tokens=4, **LOGGED)
POLICIES = [tokensparse.FastV(layer=2, keep=0.25), tokensparse.PyramidDrop(layers=(1, 3), ratio=0.5),
            tokensparse.DivPrune(keep=0.3)]


@pytest.fixture(scope="module", params=[1, 2], ids=lambda batch: f"batch{batch}")
def mistral3(request):
    return build_mistral3(batch=request.param)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda policy: policy.name)
def test_policy_equals_the_masking_oracle(mistral3, policy):
    model, inputs = mistral3
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    out = generate_without_warnings(fast, **inputs, **SETTINGS)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **SETTINGS))
    assert out.past_key_values.layers[-1].keys.shape[2] < inputs["input_ids"].shape[1]     # it pruned


def test_keep_all_equals_the_unmodified_model(mistral3):
    assert_keep_all_equals_the_model(*mistral3, **SETTINGS)


def test_snapkv_equals_the_evicting_reference(mistral3):
    model, inputs = mistral3
    policy = tokensparse.SnapKV(budget=12, window=4)
    fast = tokensparse.compile(model, tokensparse.Config(kv=policy, inductor=False))
    out = generate_without_warnings(fast, **inputs, **SETTINGS)
    with torch.no_grad():
        want, _ = evicted_generate(model, inputs, policy, **SETTINGS)
    assert_equals_oracle(out, want)
