"""Language-model pruning into a StaticCache: each pruned layer writes its kept tokens to its first slots
(prune_sequence), and decode steps attend over each layer's filled slots (static_slot_masks). generate()
equals the masking oracle, which runs with a DynamicCache, and compiles one prefill and one decode graph."""

import pytest
import torch

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, generate_without_warnings
from tests.models import build_llava
from tokensparse import Config, FastV, PyramidDrop, ToMe
from tokensparse.reference.llava import masked_generate


def _static_generate(model, inputs, config, max_cache_len=64, **settings):
    from transformers import StaticCache

    import tokensparse.backend

    compiled, backend = [], tokensparse.backend.tokensparse_backend

    def counting(gm, example_inputs, **kwargs):
        compiled.append(gm)
        return backend(gm, example_inputs, **kwargs)

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokensparse.backend, "tokensparse_backend", counting)
        fast = tokensparse.compile(model, config)
        out = generate_without_warnings(fast, **inputs, past_key_values=cache, **settings)
    return out, cache, compiled


@pytest.mark.parametrize("vision, llm, lengths", [
    (None, FastV(layer=2, keep=0.5), [43, 43, 35, 35]),
    (None, PyramidDrop(layers=(1, 3), ratio=0.5), [43, 35, 35, 31]),
    (ToMe(r=3), FastV(layer=2, keep=0.5), [37, 37, 32, 32])], ids=["fastv", "pyramiddrop", "tome_fastv"])
def test_pruning_into_a_static_cache_equals_the_oracle(vision, llm, lengths):
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    config = Config(vision=vision, llm=llm, inductor=False)
    out, cache, compiled = _static_generate(model, inputs, config, max_new_tokens=20, **LOGGED)
    assert_equals_oracle(out, masked_generate(model, inputs, llm, vision=vision, max_new_tokens=20, **LOGGED))
    assert [int(layer.cumulative_length) for layer in cache.layers] == lengths
    assert all(not layer.keys[:, :, length:].any() for layer, length in zip(cache.layers, lengths))
    assert len(compiled) == 2


def test_nothing_to_prune_into_a_static_cache_equals_the_unmodified_model():
    """keep=1.0 and r=0: the prefill compiles unchanged and the decode steps' slot masks equal generate()'s own."""
    from transformers import StaticCache

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    settings = dict(max_new_tokens=10, **LOGGED)
    out, cache, _ = _static_generate(model, inputs, Config(vision=ToMe(r=0), llm=FastV(layer=2, keep=1.0),
                                                           inductor=False), **settings)
    with torch.no_grad():
        plain = model.generate(**inputs, past_key_values=StaticCache(config=model.config, max_cache_len=64), **settings)
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [24 + 9] * 4


@pytest.mark.filterwarnings("ignore:.*no vision span")     # the vision tower's own graph, compiled apart
def test_pruning_into_a_static_cache_needs_tokensparse_compile():
    """torch.compile(model.forward) alone would leave generate()'s position-based decode masks: unchanged."""
    from transformers import StaticCache

    model, inputs = build_llava(text_layers=2, image_tokens=16, prompt=(3, 5))
    compiled = torch.compile(type(model).forward.__get__(model), backend="tokensparse",
                             options={"policy": "fastv", "layer": 1, "keep": 0.5, "inductor": False})
    with torch.no_grad(), \
            pytest.warns(tokensparse.TokensparseWarning, match="prune into a StaticCache through tokensparse.compile"):
        got = compiled(**inputs, past_key_values=StaticCache(config=model.config, max_cache_len=64)).logits
    torch.testing.assert_close(got, model(**inputs).logits)


def _padded_llava(batch=2):
    """The LLaVA batch of the tests above, its first sample's prompt left-padded by 2 positions."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2,
                                batch=batch)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :2] = 0
    return model, inputs


@pytest.mark.parametrize("vision, llm, lengths", [
    (None, FastV(layer=2, keep=0.5), [43, 43, 35, 35]),
    (None, PyramidDrop(layers=(1, 3), ratio=0.5), [43, 35, 35, 31])], ids=["fastv", "pyramiddrop"])
def test_pruning_a_padded_batch_into_a_static_cache_equals_the_oracle(vision, llm, lengths):
    """The pruned layers keep the padding in their first slots: the prefill's masked attention reads the whole
    buffer through a slot mask that hides it, and each decode step reads it from the mask over positions that
    tokensparse.compile hands it. One prefill and one decode graph."""
    model, inputs = _padded_llava()
    config = Config(vision=vision, llm=llm, inductor=False)
    out, cache, compiled = _static_generate(model, inputs, config, max_new_tokens=20, **LOGGED)
    assert_equals_oracle(out, masked_generate(model, inputs, llm, vision=vision, max_new_tokens=20, **LOGGED))
    assert [int(layer.cumulative_length) for layer in cache.layers] == lengths
    assert len(compiled) == 2


def test_nothing_to_prune_from_a_padded_batch_into_a_static_cache_equals_the_unmodified_model():
    from transformers import StaticCache

    model, inputs = _padded_llava()
    settings = dict(max_new_tokens=10, **LOGGED)
    out, _, _ = _static_generate(model, inputs, Config(llm=FastV(layer=2, keep=1.0), inductor=False), **settings)
    with torch.no_grad():
        plain = model.generate(**inputs, past_key_values=StaticCache(config=model.config, max_cache_len=64), **settings)
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_padded_batch_into_a_static_cache_refuses_what_it_cannot_mask():
    """FastV with a KV policy into a StaticCache that does not count the positions entering each layer; FastV
    past the buffer's length (its padding count is read from where the real positions start)."""
    from tokensparse import SnapKV

    model, inputs = build_llava(text_layers=2, image_tokens=16, prompt=(5, 5))
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    with pytest.raises(ValueError, match="llm=fastv and kv=snapkv together on a padded batch need the StaticCache to "
                                         "count the positions that entered each layer"):
        _static_generate(model, inputs, Config(llm=FastV(layer=1, keep=0.5), kv=SnapKV(budget=8, window=4), inductor=False),
                         max_new_tokens=2)
    model, inputs = _padded_llava()             # ToMe in the tower leaves 18 of the 24 positions in layer 0
    with pytest.raises(ValueError, match=r"llm=fastv on a padded batch into a StaticCache needs max_cache_len >= "
                                         r"the positions seen \(25\), not 20"):
        _static_generate(model, inputs, Config(vision=ToMe(r=3), llm=FastV(layer=2, keep=0.5), inductor=False),
                         max_cache_len=20, max_new_tokens=4, **LOGGED)
