"""StreamingLLM(positions="cache"): positions within the cache, as the paper assigns them. generate() equals an
independent eager reference that keeps keys before RoPE and rotates them to their cache places every step
(tokensparse.reference.kv.streaming_cache_positions_generate), also far past max_position_embeddings; what it does
not cover is a ValueError that names it."""

import pytest
import torch

import tokensparse
from tests.models import build_llama
from tokensparse import Config, FastV, StreamingLLM
from tokensparse.reference.kv import evicted_generate, streaming_cache_positions_generate

GENERATE = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def _generate(model, inputs, policy, max_new_tokens):
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    with torch.no_grad():
        return fast.generate(**inputs, max_new_tokens=max_new_tokens, **GENERATE)


def _assert_equals_reference(out, sequences, logits):
    assert torch.equal(out.sequences, sequences)
    assert len(out.logits) == len(logits)
    for got, want in zip(out.logits, logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", [None, "absolute", "Cache", 1])
def test_positions_is_original_or_cache(positions):
    if positions is None:
        assert StreamingLLM().positions == "original"
        return
    with pytest.raises(ValueError, match=r"positions=.* is unknown: choose one of \['original', 'cache'\]"):
        StreamingLLM(positions=positions)


def test_cache_positions_equal_the_rerotating_reference():
    """A 40-token prompt evicted to 2 + 10 entries in the prefill, then one entry per step: each step's query sits at
    position 12, not 40 + step; the kept keys are rotated to their slots."""
    model, inputs = build_llama(layers=2, prompt=40, batch=2)
    policy = StreamingLLM(sinks=2, window=10, positions="cache")
    out = _generate(model, inputs, policy, 20)
    sequences, logits, longest = streaming_cache_positions_generate(model, inputs["input_ids"], 2, 10, 20)
    _assert_equals_reference(out, sequences, logits)
    assert longest == 40 and [layer.keys.shape[2] for layer in out.past_key_values.layers] == [12, 12]
    original, _ = evicted_generate(model, inputs, StreamingLLM(sinks=2, window=10), max_new_tokens=20, **GENERATE)
    assert (out.logits[-1] - original.logits[-1]).abs().max() > 1e-4      # the positions changed the result


def test_generation_past_max_position_embeddings_stays_at_cache_positions():
    """max_position_embeddings=64, a 16-token prompt and 120 new tokens (136 positions): every attention reads at
    most 4 + 28 + 1 entries at positions 0..32, and the tokens and logits are the reference's, finite."""
    model, inputs = build_llama(layers=2, prompt=16, batch=2, max_position_embeddings=64)
    model.generation_config.eos_token_id = None          # all 120 steps
    policy = StreamingLLM(sinks=4, window=28, positions="cache")
    out = _generate(model, inputs, policy, 120)
    sequences, logits, longest = streaming_cache_positions_generate(model, inputs["input_ids"], 4, 28, 120)
    assert out.sequences.shape[1] == 136 > model.config.max_position_embeddings
    assert longest == 33
    assert all(bool(torch.isfinite(step).all()) for step in out.logits)
    _assert_equals_reference(out, sequences, logits)


def test_what_cache_positions_do_not_cover_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel, StaticCache

    from tokensparse.export.generation import _check_supported

    model, inputs = build_llama(layers=1, prompt=8, batch=2)
    policy = StreamingLLM(sinks=2, window=4, positions="cache")
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    padded = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]).index_fill(1, torch.tensor([0]), 0))
    with torch.no_grad(), pytest.raises(ValueError, match="on a padded batch is not supported"):
        fast.generate(**padded, max_new_tokens=2, do_sample=False)
    with torch.no_grad(), pytest.raises(ValueError, match="with a StaticCache is not supported"):
        fast.generate(**inputs, max_new_tokens=2, do_sample=False,
                      past_key_values=StaticCache(config=model.config, max_cache_len=16))
    with pytest.raises(ValueError, match="together with llm= or vision= is not supported"):
        tokensparse.compile(model, Config(llm=FastV(layer=1, keep=0.5), kv=policy, inductor=False))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="and GPT2LMHeadModel has none"):
        tokensparse.compile(gpt2, Config(kv=policy, inductor=False))
    with pytest.raises(ValueError, match="no ONNX form in the generation export"):
        _check_supported(Config(kv=policy))
    forward = torch.compile(model.forward, backend="tokensparse", options={"policy": "streamingllm", "sinks": 2,
                                                                            "window": 4, "positions": "cache"})
    with torch.no_grad(), pytest.raises(Exception, match=r"needs tokensparse.compile\(model, config\)"):
        forward(**inputs, use_cache=True)
