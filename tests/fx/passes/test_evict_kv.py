"""KV-cache eviction in generate(): the compiled (eager-run) graphs evict what the masking reference
evicts: same greedy tokens, logits within float tolerance, the kept keys are the reference's, and the
cache holds the budget. Nothing to evict leaves every graph unchanged. Left-padded batches evict too: padding
is kept last, and each decode step's mask is cut to every evicted cache."""

import warnings

import pytest
import torch

import tokensparse
from tests.generation import assert_backend_alone_changes_nothing, generate_without_warnings
from tests.models import build_llama, build_llava
from tokensparse import (H2O, AdaptiveKV, Config, FastV, KeyNorm, PyramidDrop, SnapKV, StreamingLLM, ToMe,
                         VisionBudget)
from tokensparse.reference.kv import evicted_generate

GENERATE = dict(max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def llama():
    return build_llama(layers=2, prompt=40, batch=2)


def _generate(model, inputs, config):
    fast = tokensparse.compile(model, config)
    with torch.no_grad():
        return fast.generate(**inputs, **GENERATE)


def _assert_same(out, reference):
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy, lengths", [
    (SnapKV(budget=16, window=4), 16 + 19),
    (SnapKV(budget=0.3, window=4, kernel=3, pooling="max"), 12 + 19),
    (StreamingLLM(sinks=2, window=10), 12),
    (H2O(heavy=8, recent=6), 14),
    (VisionBudget(vision=4, text=10, window=4), 14 + 19),          # a text model: every position is text
    (KeyNorm(budget=12, window=2), 12 + 19),
    (KeyNorm(budget=0.25), 10 + 19),
], ids=["snapkv", "snapkv_ratio_max", "streamingllm", "h2o", "vision_budget_text_only", "key_norm", "key_norm_ratio"])
def test_generate_equals_the_evicting_reference(llama, policy, lengths):
    model, inputs = llama
    out = _generate(model, inputs, Config(kv=policy, inductor=False))
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [lengths, lengths]
    assert all(int(alive[0, 0].sum()) == lengths for alive in log.alive.values())
    with torch.no_grad():
        plain = model.generate(**inputs, **GENERATE)
    assert not torch.allclose(out.logits[-1], plain.logits[-1])          # the eviction changed something


def test_adaptive_keeps_a_data_dependent_count_per_layer():
    model, inputs = build_llama(layers=4, prompt=40, batch=2)
    policy = AdaptiveKV(tau=0.3, window=4)
    out = _generate(model, inputs, Config(kv=policy, inductor=False))
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [int(log.alive[index][0, 0].sum()) for index in range(4)]
    assert all(length < 40 + 19 for length in lengths)


@pytest.mark.parametrize("policy, kept", [
    (VisionBudget(vision=4, text=1.0, window=2), 4 + 6 + 2),
    (VisionBudget(vision=0.25, text=3, window=2, alpha=0.5, temperature=2.0), 4 + 3 + 2),
], ids=["vision_count", "fractions_and_saliency"])
def test_vision_budgets_on_llava_equal_the_reference(policy, kept):
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    out = _generate(model, inputs, Config(kv=policy, inductor=False))
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    steps = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [kept + steps - 1] * 4
    image = inputs["input_ids"][0] == model.config.image_token_index
    for alive in log.alive.values():                      # the image keeps its budget, in every head
        assert int(alive[0, :, : image.shape[0]][:, image].sum(dim=-1).unique().item()) == 4


def test_temporal_redundancy_over_three_screenshots_equals_the_reference():
    """GUI-KV's temporal redundancy on a prompt of three images: the compiled prefill keeps what the reference
    keeps, which is not what the scores alone keep."""
    model, inputs = build_llava(text_layers=2, image_tokens=16, prompt=(3, 5), batch=2, images=3)
    image = inputs["input_ids"][0] == model.config.image_token_index
    kept = {}
    for rank in (0, 4):
        policy = VisionBudget(vision=24, window=2, temporal_rank=rank, alpha=0.1)
        out = _generate(model, inputs, Config(kv=policy, inductor=False))
        reference, log = evicted_generate(model, inputs, policy, **GENERATE)
        _assert_same(out, reference)
        kept[rank] = [alive[:, :, : image.shape[0]][:, :, image] for alive in log.alive.values()]
        assert all(int(alive.sum(dim=-1).unique()) == 24 for alive in kept[rank])
    assert any(not torch.equal(plain, aware) for plain, aware in zip(kept[0], kept[4]))


def test_a_padded_sample_whose_text_cannot_fill_its_budget_keeps_vision_positions_not_padding():
    """text=1.0 counts the padded length's text positions; a padded sample has fewer real ones. Its spare text
    slots go to its next-best vision positions: padding kept beside evicted real positions would be visible to
    the decode steps (whose masks assume padding only where every real position stays) and changed the tokens."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :3] = 0
    policy = VisionBudget(vision=4, window=4)
    out = _generate(model, inputs, Config(kv=policy, inductor=False))
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    image = inputs["input_ids"][1] == model.config.image_token_index
    for alive in log.alive.values():   # sample 1's padding is its 3 leading text tokens: 3 more image tokens instead
        prompt = alive[1, :, : image.shape[0]]
        assert not prompt[:, :3].any() and int(prompt.sum(dim=-1).unique()) == 4 + 4 + 4
        assert int(prompt[:, image].sum(dim=-1).unique()) == 4 + 3


@pytest.mark.parametrize("llm, policy, pads, lengths", [
    (FastV(layer=2, keep=0.5), VisionBudget(vision=4, window=2), 0, [31] * 4),
    (PyramidDrop(layers=(1, 3), ratio=0.5), VisionBudget(vision=0.5, text=3, window=2, alpha=0.3), 0, [32, 28, 28, 26]),
    (FastV(layer=2, keep=0.5), VisionBudget(vision=4, window=2), 3, [31] * 4),
], ids=["fastv", "pyramiddrop_fractions_and_saliency", "fastv_padded"])
def test_vision_budgets_after_a_language_model_policy_equal_the_reference_in_the_oracle(llm, policy, pads, lengths):
    """In a pruned layer the image mask is the merge's, gathered by each stage's kept positions; equal to the
    evicting reference run inside the masking oracle."""
    from tokensparse.reference.llava import _applied

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    inputs = _padded(inputs, pads=pads) if pads else inputs
    config = Config(llm=llm, kv=policy, inductor=False)
    out = generate_without_warnings(tokensparse.compile(model, config), **inputs, **GENERATE)
    with torch.no_grad(), _applied(model, inputs, config.llm):
        reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert held == [int(alive[0, 0].sum()) for alive in log.alive.values()] == lengths


def test_h2o_carries_the_references_accumulated_scores(llama):
    model, inputs = llama
    policy = H2O(heavy=8, recent=6)
    out = _generate(model, inputs, Config(kv=policy, inductor=False))
    _, log = evicted_generate(model, inputs, policy, **GENERATE)
    for index, layer in enumerate(out.past_key_values.layers):
        alive = log.alive[index]
        where = alive.nonzero()[:, -1].view(*alive.shape[:2], -1)
        torch.testing.assert_close(layer.scores, log.scores[index].gather(2, where), rtol=1e-5, atol=1e-5)


def test_h2o_without_a_scored_cache_says_what_to_pass(llama):
    model, inputs = llama
    fast = tokensparse.compile(model, Config(kv=H2O(heavy=8, recent=6), inductor=False))
    from transformers import DynamicCache

    with pytest.warns(UserWarning, match="pass past_key_values=tokensparse.ScoredCache"), torch.no_grad():
        out = fast(input_ids=inputs["input_ids"], past_key_values=DynamicCache(config=model.config), use_cache=True)
    with torch.no_grad():
        plain = model(input_ids=inputs["input_ids"], use_cache=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    assert out.past_key_values.layers[0].keys.shape[2] == inputs["input_ids"].shape[1]


def test_the_kept_keys_are_the_references(llama):
    model, inputs = llama
    policy = SnapKV(budget=10, window=4)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    from transformers import DynamicCache

    with torch.no_grad():
        ids = inputs["input_ids"]     # no attention_mask: traced, an all-ones mask is materialised (and refused)
        cache = fast(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
        full = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
    _, log = evicted_generate(model, inputs, policy, max_new_tokens=1, do_sample=False)
    for index, layer in enumerate(cache.layers):
        alive = log.alive[index]
        where = alive.nonzero()[:, -1].view(*alive.shape[:2], -1)
        want = full.layers[index].keys.gather(2, where.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1]))
        torch.testing.assert_close(layer.keys, want)


@pytest.mark.parametrize("policy", [SnapKV(budget=1.0), SnapKV(budget=64), StreamingLLM(sinks=4, window=100),
                                    H2O(heavy=50, recent=50), AdaptiveKV(tau=1.0), VisionBudget(vision=1.0, text=1.0),
                                    KeyNorm(budget=1.0)],
                         ids=["ratio_1", "budget_above_prompt", "window_above_length", "h2o_above_length", "tau_1",
                              "vision_and_text_all", "key_norm_all"])
def test_nothing_to_evict_equals_the_unmodified_model(llama, policy):
    model, inputs = llama
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _generate(model, inputs, Config(kv=policy, inductor=False))
    with torch.no_grad():
        plain = model.generate(**inputs, **GENERATE)
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits):
        assert torch.equal(got, want)


def _padded(inputs, pads=7):
    """The batch with its first sample's prompt left-padded: its first `pads` positions are padding."""
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).clone()
    mask[0, :pads] = 0
    return {**inputs, "attention_mask": mask}


@pytest.mark.parametrize("policy, length", [
    (SnapKV(budget=16, window=4), 16 + 19),
    (SnapKV(budget=36, window=4), 36 + 19),         # more than the padded sample's 33 real positions
    (StreamingLLM(sinks=2, window=10), 12),
    (H2O(heavy=8, recent=6), 14),
    (KeyNorm(budget=12, window=2), 12 + 19),
    (AdaptiveKV(tau=0.3, window=4), None),
    (VisionBudget(vision=4, text=10, window=4), 14 + 19),
], ids=["snapkv", "snapkv_keeps_padding", "streamingllm", "h2o", "key_norm", "adaptive", "vision_budget"])
def test_a_padded_batch_equals_the_evicting_reference(llama, policy, length):
    """Padding draws no attention, is kept last, and each decode step's mask is cut to every evicted cache."""
    model, inputs = llama
    padded = _padded(inputs)
    out = generate_without_warnings(tokensparse.compile(model, Config(kv=policy, inductor=False)), **padded,
                                    **GENERATE)
    reference, log = evicted_generate(model, padded, policy, **GENERATE)
    _assert_same(out, reference)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [int(log.alive[index][0, 0].sum()) for index in range(2)]
    if length is not None:
        assert lengths == [length, length]


@pytest.mark.parametrize("policy", [SnapKV(budget=16, window=4), StreamingLLM(sinks=2, window=10),
                                    H2O(heavy=8, recent=6)], ids=["snapkv", "streamingllm", "h2o"])
def test_a_padded_sample_decodes_as_it_does_alone(llama, policy):
    """Independent of the reference: the padded sample's tokens and logits are those of its prompt alone."""
    model, inputs = llama
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    batch = generate_without_warnings(fast, **_padded(inputs), **GENERATE)
    alone = generate_without_warnings(fast, input_ids=inputs["input_ids"][:1, 7:],
                                      attention_mask=inputs["attention_mask"][:1, 7:], **GENERATE)
    assert torch.equal(batch.sequences[0, 40:], alone.sequences[0, 33:])
    for got, want in zip(batch.logits, alone.logits):
        torch.testing.assert_close(got[:1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pads", [0, 5])
def test_eager_attention_masks_every_layer_as_long_as_its_own_cache(pads):
    """Eager attention always gets a decode mask; AdaptiveKV's layers keep different counts, and each gets the
    last columns of the mask over every position seen (transformers would size it by layer 0's cache)."""
    model, inputs = build_llama(layers=4, prompt=40, batch=2)
    model.set_attn_implementation("eager")
    inputs = _padded(inputs, pads) if pads else inputs
    policy = AdaptiveKV(tau=0.3, window=4)
    out = generate_without_warnings(tokensparse.compile(model, Config(kv=policy, inductor=False)), **inputs,
                                    **GENERATE)
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [int(log.alive[index][0, 0].sum()) for index in range(4)]
    if not pads:
        assert len(set(lengths)) > 1


def test_padding_outside_tokensparse_compile_is_left_unchanged_with_the_reason(llama):
    """torch.compile(model.forward) alone leaves generate() to build decode masks for the full cache."""
    model, inputs = llama
    assert_backend_alone_changes_nothing(model, _padded(inputs), {"policy": "snapkv", "budget": 16, "window": 4,
                                                                  "inductor": False},
                                         "a padded batch.*tokensparse.compile")


@pytest.mark.parametrize("policy, lengths", [
    (SnapKV(budget=20, window=2), [39, 39, 35, 35]),    # the pruned layers (16 positions) keep their padding
    (StreamingLLM(sinks=2, window=10), [12] * 4),
    (H2O(heavy=8, recent=6), [14] * 4),
    (AdaptiveKV(tau=0.3, window=4), None),
], ids=["snapkv_pruned_layers_keep_padding", "streamingllm", "h2o", "adaptive"])
def test_fastv_and_a_kv_policy_on_a_padded_batch_equal_the_evicting_reference_in_the_oracle(policy, lengths):
    """Pruned layers keep their padding, evicted ones drop it first: each layer holds max(0, padding - evicted)
    padding positions, evicted = the positions that entered it (the CountedCache generate() gets) minus those
    it holds. Equal to the evicting reference run inside the masking oracle, on a batch whose first sample has
    3 padding positions."""
    from tokensparse.reference.llava import _applied

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    padded = _padded(inputs, pads=3)
    config = Config(llm=FastV(layer=2, keep=0.5), kv=policy, inductor=False)
    out = generate_without_warnings(tokensparse.compile(model, config), **padded, **GENERATE)
    with torch.no_grad(), _applied(model, padded, config.llm):
        reference, log = evicted_generate(model, padded, policy, **GENERATE)
    _assert_same(out, reference)
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert held == [int(alive[0, 0].sum()) for alive in log.alive.values()]
    if lengths is not None:
        assert held == lengths


@pytest.mark.parametrize("tower, config, lengths", [
    ({}, Config(llm=FastV(layer=2, keep=0.5), kv=SnapKV(budget=20, window=2), inductor=False), [39, 39, 35, 35]),
    (dict(vision_layers=3, feature_layer=-2), Config(vision=ToMe(r=3), kv=SnapKV(budget=16, window=2), inductor=False),
     [16 + 19] * 4),
], ids=["fastv", "tome_in_the_tower"])
def test_a_padded_sample_under_a_sequence_policy_and_a_kv_policy_decodes_as_it_does_alone(tower, config, lengths):
    """Independent of the reference, the padded sample's tokens and logits are those of its prompt alone.
    - FastV with SnapKV: the budget keeps the pruned layers' padding and drops the others'.
    - ToMe in the vision tower shortens every layer's cache (layer 0 included) to 18 positions; SnapKV keeps 16,
      one of them the padded sample's padding (it has 15 real positions). Counting no held padding fails here."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2, **tower)
    fast = tokensparse.compile(model, config)
    batch = generate_without_warnings(fast, **_padded(inputs, pads=3), **GENERATE)
    alone = generate_without_warnings(fast, input_ids=inputs["input_ids"][:1, 3:],
                                      pixel_values=inputs["pixel_values"][:1], **GENERATE)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(batch.sequences[0, prompt:], alone.sequences[0, prompt - 3:])
    for got, want in zip(batch.logits, alone.logits):
        torch.testing.assert_close(got[:1], want, rtol=1e-4, atol=1e-5)
    assert [layer.keys.shape[2] for layer in batch.past_key_values.layers] == lengths


def test_fastv_and_a_kv_policy_on_a_padded_batch_need_a_counting_cache():
    from transformers import DynamicCache

    model, inputs = build_llava(text_layers=2, image_tokens=16, prompt=(3, 5), batch=2)
    fast = tokensparse.compile(model, Config(llm=FastV(layer=1, keep=0.5), kv=SnapKV(budget=8, window=4), inductor=False))
    with torch.no_grad(), pytest.raises(ValueError, match="need the cache to count the positions that entered each "
                                                          "layer: let generate.. make it"):
        fast.generate(**_padded(inputs, pads=2), **GENERATE, past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize("policy, length", [(SnapKV(budget=8, window=2), 8 + 19), (H2O(heavy=6, recent=4), 10),
                                            (AdaptiveKV(tau=0.5, window=2), None), (KeyNorm(budget=8), 8 + 19),
                                            (StreamingLLM(sinks=2, window=10), 12)],
                         ids=["snapkv", "h2o", "adaptive", "key_norm", "streamingllm"])
def test_fastv_and_a_kv_policy_together_on_llava(policy, length):
    """After FastV the pruned layers' cache lengths are data-dependent: SnapKV, H2O and StreamingLLM keep
    min(L, budget) there (StreamingLLM used to keep them all at prefill, one step late), AdaptiveKV its own
    data-dependent count."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    config = Config(llm=FastV(layer=2, keep=0.25), kv=policy, inductor=False)
    out = _generate(model, inputs, config)
    from tokensparse.reference.llava import _masking, _surviving_by_stage, language_layers

    layers = language_layers(model)
    columns = _surviving_by_stage(model, inputs, config.llm, layers)
    with _masking(layers, columns):
        reference, log = evicted_generate(model, inputs, config.kv, **GENERATE)
    _assert_same(out, reference)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [int(log.alive[index][0, 0].sum()) for index in range(4)]
    if length is not None:
        assert lengths == [length] * 4


def test_a_new_prompt_length_recompiles_dynamic_and_still_evicts():
    """The third prompt length compiles a graph with a symbolic sequence length: the pass re-propagates it
    (masked_scatter's meta needs the Python dispatcher) and SnapKV still equals the reference."""
    model, _ = build_llava(text_layers=2, image_tokens=16, prompt=(3, 5), batch=2)
    policy = SnapKV(budget=8, window=2)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    for prompt in ((3, 5), (4, 7), (6, 9)):
        _, inputs = build_llava(text_layers=2, image_tokens=16, prompt=prompt, batch=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tokensparse.TokensparseWarning)
            with torch.no_grad():
                out = fast.generate(**inputs, **GENERATE)
        reference, log = evicted_generate(model, inputs, policy, **GENERATE)
        _assert_same(out, reference)
        steps = out.sequences.shape[1] - inputs["input_ids"].shape[1]
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [8 + steps - 1] * 2
        assert [int(alive[0, 0].sum()) for alive in log.alive.values()] == [8 + steps - 1] * 2


@pytest.mark.parametrize("policy, length", [(SnapKV(budget=16, window=4), 16 + 19), (H2O(heavy=8, recent=6), 14)],
                         ids=["snapkv", "h2o"])
def test_a_qwen2_text_model_equals_the_evicting_reference(policy, length):
    """Qwen2's q/k/v projections carry biases; the cache sites and scores are found the same way."""
    model, inputs = build_llama(layers=2, prompt=40, family="qwen2")
    out = _generate(model, inputs, Config(kv=policy, inductor=False))
    reference, _ = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [length, length]


def _static_generate(model, inputs, config, max_cache_len=64, cache=None, **settings):
    """fast.generate() into `cache`, or a fresh StaticCache (a ScoredStaticCache for H2O); returns (output, the
    cache, graphs the backend compiled)."""
    from transformers import StaticCache

    import tokensparse.backend

    compiled = []
    backend = tokensparse.backend.tokensparse_backend

    def counting(gm, example_inputs, **kwargs):
        compiled.append(gm)
        return backend(gm, example_inputs, **kwargs)

    if cache is not None:
        pass
    elif isinstance(config.kv, H2O) and settings.pop("scored", True):
        cache = tokensparse.ScoredStaticCache(model.config, max_cache_len=max_cache_len)
    else:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokensparse.backend, "tokensparse_backend", counting)
        fast = tokensparse.compile(model, config)
        with torch.no_grad():
            out = fast.generate(**inputs, **{**GENERATE, **settings}, past_key_values=cache)
    return out, cache, compiled


@pytest.mark.parametrize("policy, kept", [(SnapKV(budget=16, window=4), 16), (KeyNorm(budget=12, window=2), 12),
                                          (AdaptiveKV(tau=0.3, window=4), None)], ids=["snapkv", "key_norm", "adaptive"])
def test_a_static_cache_equals_the_evicting_reference_without_recompiling(llama, policy, kept):
    """The prefill writes the kept positions into the buffers' first slots and sets the length to their count;
    decode steps write after them and attend over the filled slots. One prefill and one decode graph."""
    model, inputs = llama
    out, cache, compiled = _static_generate(model, inputs, Config(kv=policy, inductor=False))
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    lengths = [int(layer.cumulative_length) for layer in cache.layers]
    want = [int(alive[0, 0].sum()) for alive in log.alive.values()] if kept is None else [kept + 19] * 2
    assert lengths == want
    for layer, length in zip(cache.layers, lengths):
        assert not layer.keys[:, :, length:].any()                 # nothing was written past the filled slots
    assert len(compiled) == 2


@pytest.mark.parametrize("policy, capacity, length", [(StreamingLLM(sinks=2, window=10), 41, 12),
                                                       (StreamingLLM(sinks=4, window=50), 64, 54),
                                                       (H2O(heavy=8, recent=6), 41, 14),
                                                       (H2O(heavy=30, recent=20), 64, 50)],
                         ids=["streamingllm", "streamingllm_decode_only", "h2o", "h2o_decode_only"])
def test_policies_that_evict_each_step_keep_a_static_cache_at_their_budget(llama, policy, capacity, length):
    """The prefill keeps its selection in the first slots (H2O: with the prompt's attention as the slots'
    scores); after each decode step's attention, tokensparse::keep_sinks_and_window or ::heavy_and_recent
    (which first adds the step's attention to the scores) moves the kept slots to the front in place. A cache
    of 41 slots then serves 40 + 20 tokens. Equal to the evicting reference; one prefill and one decode graph."""
    model, inputs = llama
    out, cache, compiled = _static_generate(model, inputs, Config(kv=policy, inductor=False), max_cache_len=capacity)
    reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [length] * 2
    assert [int(alive[0, 0].sum()) for alive in log.alive.values()] == [length] * 2
    assert all(not layer.keys[:, :, length:].any() for layer in cache.layers)
    assert len(compiled) == 2


def test_keep_sinks_and_window_is_opcheck_clean():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 16, 4, generator=generator), torch.randn(2, 2, 16, 4, generator=generator)
    keys[:, :, 13:], values[:, :, 13:] = 0, 0             # 13 filled slots of 16
    length = torch.tensor(13)
    torch.library.opcheck(torch.ops.tokensparse.keep_sinks_and_window, (keys, values, length, 2, 5))
    before = keys.clone()
    torch.ops.tokensparse.keep_sinks_and_window(keys, values, length, 2, 5)
    assert int(length) == 7 and torch.equal(keys[:, :, :7], before[:, :, [0, 1, 8, 9, 10, 11, 12]])
    assert not keys[:, :, 7:].any()
    # a padded sample: its first 3 slots hold padding, so its sinks are slots 3 and 4
    keys, values = before.clone(), torch.randn(2, 2, 16, 4, generator=generator)
    length, padding = torch.tensor(13), torch.zeros(2, 16, dtype=torch.bool)
    padding[0, :3] = True
    torch.library.opcheck(torch.ops.tokensparse.keep_sinks_and_window, (keys, values, length, 2, 5, padding))
    torch.ops.tokensparse.keep_sinks_and_window(keys, values, length, 2, 5, padding)
    assert torch.equal(keys[0, :, :7], before[0, :, [3, 4, 8, 9, 10, 11, 12]])
    assert torch.equal(keys[1, :, :7], before[1, :, [0, 1, 8, 9, 10, 11, 12]])


def test_heavy_and_recent_is_opcheck_clean_and_keeps_the_best_slots():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 16, 4, generator=generator), torch.randn(1, 2, 16, 4, generator=generator)
    keys[:, :, 13:], values[:, :, 13:] = 0, 0             # 13 filled slots of 16
    scores = torch.zeros(1, 2, 16)
    scores[:, :, :10] = torch.arange(10.0)                 # slot 9 heaviest among the slots before the recent ones
    q = torch.randn(1, 4, 1, 4, generator=generator)
    args = (keys, values, scores, torch.tensor(13), q, 0.5, 5, 3)
    torch.library.opcheck(torch.ops.tokensparse.heavy_and_recent, args)
    before = keys.clone()
    torch.ops.tokensparse.heavy_and_recent(*args)
    assert int(args[3]) == 5 and torch.equal(keys[:, :, :5], before[:, :, [8, 9, 10, 11, 12]])
    assert not keys[:, :, 5:].any() and not scores[:, :, 5:].any()
    # padding in the first 2 slots, scored highest: ranked last all the same, and drawing no attention
    keys, scores = before.clone(), torch.zeros(1, 2, 16)
    scores[:, :, :10] = torch.arange(10.0)
    scores[:, :, :2] = 100.0
    padding = torch.zeros(1, 16, dtype=torch.bool)
    padding[0, :2] = True
    args = (keys, values, scores, torch.tensor(13), q, 0.5, 5, 3, padding)
    torch.library.opcheck(torch.ops.tokensparse.heavy_and_recent, args)
    torch.ops.tokensparse.heavy_and_recent(*args)
    assert torch.equal(keys[:, :, :5], before[:, :, [8, 9, 10, 11, 12]])


def test_a_static_cache_without_scores_keeps_h2o_unchanged_with_the_fix(llama):
    from transformers import StaticCache

    model, inputs = llama
    with pytest.warns(tokensparse.TokensparseWarning, match="this StaticCache carries no scores: pass "
                                                            r"past_key_values=tokensparse.ScoredStaticCache"):
        out, cache, _ = _static_generate(model, inputs, Config(kv=H2O(heavy=8, recent=6), inductor=False),
                                         scored=False)
    with torch.no_grad():
        plain = model.generate(**inputs, **GENERATE, past_key_values=StaticCache(config=model.config, max_cache_len=64))
    _assert_same(out, plain)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [59, 59]


@pytest.mark.parametrize("policy, capacity, length", [
    (SnapKV(budget=36, window=4), 64, 36 + 19),             # keeps 3 of the padded sample's 7 padding positions
    (StreamingLLM(sinks=2, window=38), 41, 40),             # evicts padding while decoding, past 41 positions
    (H2O(heavy=30, recent=20), 64, 50),                     # keeps padding through the prefill, evicts it later
    (AdaptiveKV(tau=0.3, window=4), 64, None),
    (VisionBudget(vision=4, text=10, window=4), 64, 14 + 19),
], ids=["snapkv_keeps_padding", "streamingllm_small_buffer", "h2o", "adaptive", "vision_budget"])
def test_a_padded_batch_into_a_static_cache_equals_the_evicting_reference(llama, policy, capacity, length):
    """The prefill ranks padding below every real position; each decode step gets the mask over positions
    (tokensparse.compile's create_masks_for_generate), from which every layer hides the slots that still hold
    padding, and StreamingLLM's and H2O's in-place steps rank those slots last too. Once 40 + 20 positions
    outnumber 41 slots, the mask covers the last 41 positions. One prefill and one decode graph."""
    model, inputs = llama
    padded = _padded(inputs)
    out, cache, compiled = _static_generate(model, padded, Config(kv=policy, inductor=False), max_cache_len=capacity)
    reference, log = evicted_generate(model, padded, policy, **GENERATE)
    _assert_same(out, reference)
    lengths = [int(layer.cumulative_length) for layer in cache.layers]
    assert lengths == [int(alive[0, 0].sum()) for alive in log.alive.values()]
    if length is not None:
        assert lengths == [length, length]
    assert len(compiled) == 2


def test_a_counted_static_cache_under_a_kv_policy_alone_masks_as_a_plain_one(llama):
    """Without a language-model policy the count of entered positions is not read: StreamingLLM past a 41-slot
    buffer (where the mask covers only the last 41 positions) into a CountedStaticCache equals the reference."""
    model, inputs = llama
    padded, policy = _padded(inputs), StreamingLLM(sinks=2, window=38)
    cache = tokensparse.CountedStaticCache(model.config, max_cache_len=41)
    out, cache, _ = _static_generate(model, padded, Config(kv=policy, inductor=False), cache=cache)
    reference, _ = evicted_generate(model, padded, policy, **GENERATE)
    _assert_same(out, reference)
    assert [int(layer.entered) for layer in cache.layers] == [59, 59]


def test_a_padded_sample_in_a_static_cache_decodes_as_it_does_alone(llama):
    """Independent of the reference: with StreamingLLM keeping padding through the prefill and evicting it while
    decoding, the padded sample's tokens and logits are those of its prompt alone."""
    model, inputs = llama
    policy = StreamingLLM(sinks=4, window=30)
    batch, _, _ = _static_generate(model, _padded(inputs), Config(kv=policy, inductor=False), max_cache_len=41)
    alone, _, _ = _static_generate(model, {"input_ids": inputs["input_ids"][:1, 7:],
                                           "attention_mask": inputs["attention_mask"][:1, 7:]},
                                   Config(kv=policy, inductor=False), max_cache_len=41)
    assert torch.equal(batch.sequences[0, 40:], alone.sequences[0, 33:])
    for got, want in zip(batch.logits, alone.logits):
        torch.testing.assert_close(got[:1], want, rtol=1e-4, atol=1e-5)


def test_decode_steps_called_by_hand_into_a_static_cache_take_the_2d_mask(llama):
    """A serving loop that calls the forward itself: the 2-D mask of a padded decode step becomes the mask over
    positions as in generate(); a 4-D mask that tokensparse did not build is refused with the reason."""
    from transformers import StaticCache

    model, inputs = llama
    padded = _padded(inputs)
    policy = SnapKV(budget=36, window=4)
    fast = tokensparse.compile(model, Config(kv=policy, inductor=False))
    want, _ = evicted_generate(model, padded, policy, **{**GENERATE, "max_new_tokens": 2})
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        positions = padded["attention_mask"].cumsum(-1) - 1
        fast(**padded, past_key_values=cache, position_ids=positions.clamp(min=0))
        mask = torch.cat([padded["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = fast(input_ids=want.sequences[:, 40:41], attention_mask=mask, past_key_values=cache,
                    position_ids=(mask.cumsum(-1) - 1)[:, -1:])
        torch.testing.assert_close(step.logits[:, -1], want.logits[1], rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="got a 4-D attention_mask that tokensparse did not build"):
            fast(input_ids=want.sequences[:, 41:42], attention_mask=torch.ones(2, 1, 1, 64, dtype=torch.bool),
                 past_key_values=cache)


@pytest.mark.parametrize("policy, length", [(StreamingLLM(sinks=2, window=10), 12), (H2O(heavy=8, recent=6), 14)],
                         ids=["streamingllm", "h2o"])
def test_fastv_and_a_kv_policy_into_a_static_cache(policy, length):
    """FastV's pruned layers write their kept tokens to their first slots, the KV policy then evicts those
    (min(L, budget) at prefill) and keeps the buffers at the budget while decoding; equal to the evicting
    reference inside the masking oracle, one prefill and one decode graph."""
    from tokensparse.reference.llava import _applied

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    config = Config(llm=FastV(layer=2, keep=0.5), kv=policy, inductor=False)
    out, cache, compiled = _static_generate(model, inputs, config)
    with torch.no_grad(), _applied(model, inputs, config.llm):
        reference, log = evicted_generate(model, inputs, policy, **GENERATE)
    _assert_same(out, reference)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [length] * 4
    assert [int(alive[0, 0].sum()) for alive in log.alive.values()] == [length] * 4
    assert len(compiled) == 2


@pytest.mark.parametrize("policy, lengths", [(SnapKV(budget=20, window=2), [39, 39, 35, 35]),
                                             (H2O(heavy=8, recent=6), [14] * 4)], ids=["snapkv", "h2o"])
def test_fastv_and_a_kv_policy_on_a_padded_batch_into_a_counted_static_cache(policy, lengths):
    """A CountedStaticCache counts the positions that entered each layer, from which each decode graph finds the
    padding slots of a layer both pruned and evicted (SnapKV's budget keeps the pruned layers' padding and drops
    the others'). Equal to the evicting reference inside the masking oracle; one prefill and one decode graph."""
    from tokensparse.reference.llava import _applied

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), batch=2)
    padded = _padded(inputs, pads=3)
    config = Config(llm=FastV(layer=2, keep=0.5), kv=policy, inductor=False)
    cache = tokensparse.CountedStaticCache(model.config, max_cache_len=64, scores=policy.scored)
    out, cache, compiled = _static_generate(model, padded, config, cache=cache)
    with torch.no_grad(), _applied(model, padded, config.llm):
        reference, log = evicted_generate(model, padded, policy, **GENERATE)
    _assert_same(out, reference)
    assert [int(layer.cumulative_length) for layer in cache.layers] == lengths
    assert [int(layer.entered) for layer in cache.layers] == [24 + 19] * 2 + [16 + 19] * 2
    assert len(compiled) == 2


def test_fastv_and_a_kv_policy_on_a_padded_batch_into_a_plain_static_cache_name_the_fix():
    model, inputs = build_llava(text_layers=2, image_tokens=16, prompt=(3, 5), batch=2)
    with pytest.raises(ValueError, match=r"need the StaticCache to count the positions that entered each layer: "
                                         r"pass past_key_values=tokensparse.CountedStaticCache\(model.config, "
                                         r"max_cache_len, scores=True\)"):
        _static_generate(model, _padded(inputs, pads=3), Config(llm=FastV(layer=1, keep=0.5),
                                                                kv=H2O(heavy=8, recent=6), inductor=False))


def test_a_static_cache_outside_tokensparse_compile_is_left_unchanged_with_the_reason(llama):
    """torch.compile(model.forward) alone cannot check for padding, so it does not evict from a StaticCache."""
    from transformers import StaticCache

    model, inputs = llama
    compiled = torch.compile(type(model).forward.__get__(model), backend="tokensparse",
                             options={"policy": "snapkv", "budget": 16, "window": 4, "inductor": False})
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad(), pytest.warns(tokensparse.TokensparseWarning, match="evicting from a StaticCache needs "
                                                                            "tokensparse.compile"):
        got = compiled(**inputs, past_key_values=cache).logits
        want = model(**inputs).logits
    torch.testing.assert_close(got, want)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [40, 40]


@pytest.mark.parametrize("policy, pads", [(SnapKV(budget=1.0), 0), (StreamingLLM(sinks=4, window=60), 0),
                                          (H2O(heavy=30, recent=30), 0), (SnapKV(budget=1.0), 7)],
                         ids=["snapkv", "streamingllm", "h2o", "snapkv_padded"])
def test_a_static_cache_with_nothing_to_evict_equals_the_unmodified_model(llama, policy, pads):
    """Budgets that keep every position; the decode graphs' slot masks then equal generate()'s own (also those
    that hide a padded batch's padding slots), and the in-place steps (StreamingLLM's, H2O's) move nothing."""
    from transformers import StaticCache

    model, inputs = llama
    inputs = _padded(inputs, pads) if pads else inputs
    out, cache, _ = _static_generate(model, inputs, Config(kv=policy, inductor=False))
    with torch.no_grad():
        plain = model.generate(**inputs, **GENERATE, past_key_values=StaticCache(config=model.config, max_cache_len=64))
    assert torch.equal(out.sequences, plain.sequences)
    for got, want in zip(out.logits, plain.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [59, 59]
