"""Idefics3 (SmolVLM's architecture): its image merge reads the image-token count with .item(), which only
traces with capture_scalar_outputs (scoped to the compiled model's calls). FastV equals the masking oracle and
SnapKV its evicting reference, without a warning from the graphs a graph break splits off."""

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, generate_without_warnings
from tests.models import build_idefics3
from tokensparse.reference.kv import evicted_generate
from tokensparse.reference.llava import masked_generate

SETTINGS = dict(max_new_tokens=4, **LOGGED)


def test_fastv_and_snapkv_equal_their_references_without_warnings():
    model, inputs = build_idefics3()
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    out = generate_without_warnings(fast, **inputs, **SETTINGS)
    assert_equals_oracle(out, masked_generate(model, inputs, policy, **SETTINGS))
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [27, 27, 15, 15]
    kv = tokensparse.SnapKV(budget=12, window=4)
    fast = tokensparse.compile(model, tokensparse.Config(kv=kv, inductor=False))
    out = generate_without_warnings(fast, **inputs, **SETTINGS)
    want, _ = evicted_generate(model, inputs, kv, **SETTINGS)
    assert_equals_oracle(out, want)
