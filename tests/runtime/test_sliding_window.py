"""KV policies on sliding-window layers (Mistral; Qwen2 with full and sliding layers): tokensparse.compile evicts
what the evicting reference (a full cache, masked by position) evicts, padded or not, within the window into a
DynamicCache and a StaticCache, and past it into the PositionedCache generate() gets; a generation or a forward past
the window with a cache that does not record positions is refused before it runs; torch.compile(model.forward)
alone leaves the graph unchanged with the reason."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import tokensparse
from tests.generation import (LOGGED, assert_backend_alone_changes_nothing, assert_equals_oracle,
                              generate_without_warnings)
from tests.models import build_llama
from tokensparse import H2O, AdaptiveKV, Config, KeyNorm, SnapKV, StreamingLLM
from tokensparse.reference.kv import evicted_generate
from tokensparse.runtime.positioned_cache import PositionedCache
from tokensparse.runtime.sliding_window import layer_windows, sliding_window

WINDOW = 64
GREEDY = dict(LOGGED, max_new_tokens=20, min_new_tokens=20)     # 40 + 20 - 1 positions: within the window
SHORT = 24      # a window shorter than the prompt (40): the prefill and every decode step pass it


@pytest.fixture(scope="module")
def mistral():
    model, inputs = build_llama(layers=2, prompt=40, family="mistral")
    model.config.sliding_window = WINDOW
    return model, inputs


@pytest.fixture(scope="module")
def mistral_short_window():
    return build_llama(layers=2, prompt=40, family="mistral", sliding_window=SHORT)


def _padded(inputs: dict, padding: int = 5) -> dict:
    mask = inputs["attention_mask"].clone()
    mask[0, :padding] = 0
    return {**inputs, "attention_mask": mask}


def _assert_holds_what_the_reference_keeps(cache, log) -> None:
    """Each layer holds, per sample and KV head, the positions the reference keeps alive, in order (a sliding-
    window layer the last window - 1 of those its policy keeps)."""
    for index, layer in enumerate(cache.layers):
        alive = log.alive[index]
        kept = alive.nonzero()[:, -1].view(*alive.shape[:2], -1)
        assert torch.equal(layer.positions, kept)
        assert layer.keys.shape[2] == kept.shape[-1]


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
    """Into the model's own sliding-window layers, which hold no positions (H2O: into the PositionedScoredCache
    generate() gets, as its scores need)."""
    model, inputs = mistral
    inputs = _padded(inputs) if padded else inputs
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    cache = None if isinstance(policy, H2O) else DynamicCache(config=model.config)
    out = generate_without_warnings(fast, **inputs, **GREEDY, past_key_values=cache)
    reference, _ = evicted_generate(model, inputs, policy, **GREEDY)
    assert_equals_oracle(out, reference)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [held, held]
    assert all(layer.is_sliding for layer in out.past_key_values.layers) == (cache is not None)


def test_a_static_cache_of_sliding_window_layers_equals_the_reference(mistral):
    model, inputs = mistral
    policy = StreamingLLM(sinks=2, window=10)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    cache = StaticCache(config=model.config, max_cache_len=WINDOW)
    out = generate_without_warnings(fast, **inputs, **GREEDY, past_key_values=cache)
    reference, _ = evicted_generate(model, inputs, policy, **GREEDY)
    assert_equals_oracle(out, reference)
    assert all(layer.is_sliding and int(layer.cumulative_length) == 12 for layer in cache.layers)


@pytest.mark.parametrize("policy, padding", [
    (SnapKV(budget=16, window=4), 0),
    (StreamingLLM(sinks=2, window=10), 0),
    (H2O(heavy=8, recent=6), 0),
    (KeyNorm(budget=12, window=4), 0),
    (AdaptiveKV(tau=0.5, window=4), 0),
    (SnapKV(budget=16, window=4), 20),
    (StreamingLLM(sinks=2, window=10), 20),
    (H2O(heavy=8, recent=6), 20),
], ids=["snapkv", "streamingllm", "h2o", "key_norm", "adaptive", "snapkv_padded", "streamingllm_padded",
        "h2o_padded"])
def test_eviction_past_the_window_equals_the_reference(mistral_short_window, policy, padding):
    """Prompts of 40 in a window of 24, 20 new tokens; a padded sample's 20 padding positions reach past the start
    of its last query's window."""
    model, inputs = mistral_short_window
    inputs = _padded(inputs, padding) if padding else inputs
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    out = generate_without_warnings(fast, **inputs, **GREEDY)
    reference, log = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    assert_equals_oracle(out, reference)
    assert isinstance(out.past_key_values, PositionedCache)
    _assert_holds_what_the_reference_keeps(out.past_key_values, log)
    assert all(layer.keys.shape[2] <= SHORT - 1 for layer in out.past_key_values.layers)    # as a sliding layer


def test_nothing_to_evict_past_the_window_equals_the_unmodified_model(mistral_short_window):
    """budget=1.0 keeps every position: the PositionedCache's window over positions and its last 23 entries are
    what transformers' own sliding-window cache holds and masks."""
    model, inputs = mistral_short_window
    inputs = _padded(inputs, 20)
    fast = tokensparse.compile(model, Config(kv=SnapKV(budget=1.0), inductor=False))
    out = generate_without_warnings(fast, **inputs, **GREEDY)
    with torch.no_grad():
        want = model.generate(**inputs, **GREEDY)
    assert_equals_oracle(out, want)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [SHORT - 1] * 2


def test_eager_attention_past_the_window_equals_the_reference():
    """The unfused attention's additive mask, narrowed to the window: H2O on the padded batch."""
    model, inputs = build_llama(layers=2, prompt=40, family="mistral", sliding_window=SHORT)
    model.set_attn_implementation("eager")
    inputs, policy = _padded(inputs, 20), H2O(heavy=8, recent=6)
    out = generate_without_warnings(tokensparse.compile(model, Config(kv=policy, inductor=False)), **inputs, **GREEDY)
    reference, log = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    assert_equals_oracle(out, reference)
    _assert_holds_what_the_reference_keeps(out.past_key_values, log)


def test_past_the_window_the_window_decides_what_is_attended(mistral_short_window):
    """The reference above is not the same model without its window: the window hides held positions."""
    model, inputs = mistral_short_window
    policy = SnapKV(budget=16, window=4)
    windowed, _ = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    model.config.sliding_window = None
    try:
        unwindowed, _ = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    finally:
        model.config.sliding_window = SHORT
    assert not torch.equal(windowed.sequences, unwindowed.sequences)


def test_full_and_sliding_layers_past_the_window_equal_the_reference():
    """Qwen2 whose first layer attends to every position and whose second slides."""
    model, inputs = build_llama(layers=2, prompt=40, family="qwen2", use_sliding_window=True, sliding_window=SHORT,
                                max_window_layers=1)
    assert layer_windows(model, SHORT) == (0, SHORT)
    policy = SnapKV(budget=16, window=4)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    out = generate_without_warnings(fast, **inputs, **GREEDY)
    reference, log = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    assert_equals_oracle(out, reference)
    _assert_holds_what_the_reference_keeps(out.past_key_values, log)


def test_a_forward_by_hand_past_the_window_into_a_positioned_cache(mistral_short_window):
    """A decode loop by hand: the PositionedCache's forwards equal generate()'s, step by step. An evicted cache
    holds fewer entries than positions, so the loop passes the position of each new token, as generate() does."""
    model, inputs = mistral_short_window
    policy = SnapKV(budget=16, window=4)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    cache, logits = PositionedCache(), []
    with torch.no_grad():
        out = fast(**inputs, past_key_values=cache, use_cache=True)
        mask = inputs["attention_mask"]
        for _ in range(GREEDY["max_new_tokens"]):
            logits.append(out.logits[:, -1])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = torch.full((mask.shape[0], 1), mask.shape[1] - 1)
            out = fast(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True)
    reference, _ = evicted_generate(model, inputs, policy, past_key_values=DynamicCache(), **GREEDY)
    for got, want in zip(logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert int(cache.layers[0].seen) == 40 + GREEDY["max_new_tokens"]


def test_a_generation_past_the_window_without_positions_is_refused_before_it_starts(mistral):
    model, inputs = mistral
    fast = tokensparse.compile(model, Config(kv=SnapKV(budget=16, window=4), inductor=False))
    sliding = DynamicCache(config=model.config)                     # sliding layers: no positions
    with pytest.raises(ValueError, match="hold at most the last 64 positions, and this generation needs 65"):
        fast.generate(**inputs, max_new_tokens=26, do_sample=False, past_key_values=sliding)
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
