"""KV policies on sliding-window layers (Mistral): while every position fits the window, tokensparse.compile
evicts what the evicting reference evicts, into a DynamicCache and a StaticCache, padded or not; a generation or
a forward that would pass the window is refused before it runs; torch.compile(model.forward) alone leaves the
graph unchanged with the reason."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import tokensparse
from tests.generation import (LOGGED, assert_backend_alone_changes_nothing, assert_equals_oracle,
                              generate_without_warnings)
from tests.models import build_llama
from tokensparse import H2O, Config, SnapKV, StreamingLLM
from tokensparse.reference.kv import evicted_generate
from tokensparse.runtime.sliding_window import sliding_window

WINDOW = 64
GREEDY = dict(LOGGED, max_new_tokens=20, min_new_tokens=20)     # 40 + 20 - 1 positions: within the window


@pytest.fixture(scope="module")
def mistral():
    model, inputs = build_llama(layers=2, prompt=40, family="mistral")
    model.config.sliding_window = WINDOW
    return model, inputs


def _padded(inputs: dict) -> dict:
    mask = inputs["attention_mask"].clone()
    mask[0, :5] = 0
    return {**inputs, "attention_mask": mask}


def test_the_window_is_read_from_the_text_config(mistral):
    model, _ = mistral
    assert sliding_window(model) == WINDOW
    assert sliding_window(build_llama(layers=1, prompt=4)[0]) is None


@pytest.mark.parametrize("policy, held, padded", [
    (SnapKV(budget=16, window=4), 16 + 19, False),
    (StreamingLLM(sinks=2, window=10), 12, False),
    (H2O(heavy=8, recent=6), 14, False),
    (SnapKV(budget=16, window=4), 16 + 19, True),
    (StreamingLLM(sinks=2, window=10), 12, True),
], ids=["snapkv", "streamingllm", "h2o", "snapkv_padded", "streamingllm_padded"])
def test_eviction_within_the_window_equals_the_reference(mistral, policy, held, padded):
    model, inputs = mistral
    inputs = _padded(inputs) if padded else inputs
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    out = generate_without_warnings(fast, **inputs, **GREEDY)
    reference, _ = evicted_generate(model, inputs, policy, **GREEDY)
    assert_equals_oracle(out, reference)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [held, held]
    if not isinstance(policy, H2O):                 # H2O's ScoredCache has full layers, the others sliding ones
        assert all(layer.is_sliding for layer in out.past_key_values.layers)


def test_a_static_cache_of_sliding_window_layers_equals_the_reference(mistral):
    model, inputs = mistral
    policy = StreamingLLM(sinks=2, window=10)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    cache = StaticCache(config=model.config, max_cache_len=WINDOW)
    out = generate_without_warnings(fast, **inputs, **GREEDY, past_key_values=cache)
    reference, _ = evicted_generate(model, inputs, policy, **GREEDY)
    assert_equals_oracle(out, reference)
    assert all(layer.is_sliding and int(layer.cumulative_length) == 12 for layer in cache.layers)


def test_a_generation_past_the_window_is_refused_before_it_starts(mistral):
    model, inputs = mistral
    fast = tokensparse.compile(model, Config(kv=SnapKV(budget=16, window=4), inductor=False))
    with pytest.raises(ValueError, match="hold at most the last 64 positions, and this generation needs 65"):
        fast.generate(**inputs, max_new_tokens=26, do_sample=False)
    buffer = StaticCache(config=model.config, max_cache_len=48)     # a shorter sliding buffer is the limit
    with pytest.raises(ValueError, match="hold at most the last 48 positions, and this generation needs 49"):
        fast.generate(**inputs, max_new_tokens=10, do_sample=False, past_key_values=buffer)


def test_a_forward_past_the_window_is_refused(mistral):
    """A decode loop by hand: each forward counts the positions the sliding-window layers have seen."""
    model, inputs = mistral
    fast = tokensparse.compile(model, Config(kv=SnapKV(budget=16, window=4), inductor=False))
    cache = DynamicCache(config=model.config)
    steps = 0
    with torch.no_grad(), pytest.raises(ValueError, match="this forward needs 65"):
        out = fast(input_ids=inputs["input_ids"], past_key_values=cache, use_cache=True)
        while True:
            out = fast(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            steps += 1
    assert steps == WINDOW - 40 and cache.layers[0].keys.shape[2] == 16 + steps


def test_the_backend_alone_leaves_sliding_window_layers_unchanged_with_the_reason(mistral):
    """torch.compile(model.forward) cannot refuse positions past the window, so it does not evict."""
    model, inputs = mistral
    options = {"policy": "snapkv", "budget": 16, "window": 4, "inductor": False}
    reason = "keeps a sliding window of the keys.*tokensparse.compile"
    assert_backend_alone_changes_nothing(model, inputs, options, reason)
