"""A vision-encoder policy (ToMe, TopK) in a LLaVA tower, alone or before a language-model policy and a KV
policy: each surviving token fills its first source patch's image position, and generate() equals the oracle
that runs the eager reference tower, writes those tokens into the projector's input and masks the rest."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tokensparse
from tests.generation import LOGGED, assert_equals_oracle, generate_without_warnings
from tests.models import build_llava, build_llava_onevision
from tokensparse import Config, FastV, PyramidDrop, SnapKV, ToMe, TopK
from tokensparse.policies.base import recorder
from tokensparse.policies.token_sources import features_at_source_rows, token_sources
from tokensparse.policies.tome import tome_step
from tokensparse.policies.topk import topk_step
from tokensparse.reference.kv import evicted_generate
from tokensparse.reference.llava import _applied, _replayed_sources, masked_generate


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(5, 40), kinds=st.lists(st.sampled_from(["tome", "topk", "fuse"]),
                                                                          min_size=1, max_size=3),
       seed=st.integers(0, 999))
def test_source_rows_equal_the_replayed_selections(batch, tokens, kinds, seed):
    """The policy steps applied to an identity give each token the rows that replaying the recorded
    selections on sets gives; the features land at the first of them, ascending and distinct."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 6, generator=generator)
    sources, size = token_sources(x), torch.ones(batch, tokens, 1)
    with recorder.recording() as steps:
        for kind in kinds:
            count = x.shape[1]
            if count < 4:
                break
            q, k = torch.randn(batch, 2, count, 3, generator=generator), torch.randn(batch, 2, count, 3,
                                                                                    generator=generator)
            if kind == "tome":
                r = (count - 1) // 2
                (x, new_size), (sources, _) = tome_step(x, size, k, r, 1), tome_step(sources, size, k, r, 1)
                size = new_size
            else:
                x = topk_step(x, q, k, 0.5, (count - 1) // 2, 1, kind == "fuse")
                sources = topk_step(sources, q, k, 0.5, (count - 1) // 2, 1, kind == "fuse")
                size = torch.ones(batch, x.shape[1], 1)
    if not steps:
        return
    full, rows = features_at_source_rows(x, sources)
    selections = steps[::2]         # each step ran twice: on the tokens, then on their sources
    for b in range(batch):
        want = sorted(min(source) for source in _replayed_sources(selections, b, tokens))
        assert rows[b].tolist() == want
    assert full.shape == (batch, tokens, 6)
    for b in range(batch):
        kept = set(rows[b].tolist())
        assert all(full[b, row].abs().sum() == 0 for row in range(tokens) if row not in kept)
    torch.library.opcheck(torch.ops.tokensparse.features_at_source_rows, (x, sources))


COMBINATIONS = [(ToMe(r=3), FastV(layer=2, keep=0.5), [37, 37, 32, 32]),
                (TopK(layers=(1,), keep=0.5), None, [35] * 4),
                (TopK(layers=(0,), keep=0.5, fuse=True), PyramidDrop(layers=(1, 3), ratio=0.5), [36, 31, 31, 29])]


@pytest.mark.parametrize("vision, llm, lengths", COMBINATIONS, ids=["tome_fastv", "topk", "topk_fuse_pyramiddrop"])
def test_generate_equals_the_oracle(vision, llm, lengths):
    """20 greedy tokens and every step's logits equal the oracle; every layer's cache holds the text, the
    image tokens the tower left, then what the language-model policy kept, and the generated tokens."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    fast = tokensparse.compile(model, Config(vision=vision, llm=llm, inductor=False))
    out = generate_without_warnings(fast, **inputs, max_new_tokens=20, **LOGGED)
    assert_equals_oracle(out, masked_generate(model, inputs, llm, vision=vision, max_new_tokens=20, **LOGGED))
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == lengths
    plain = model.generate(**inputs, max_new_tokens=1, **LOGGED)
    assert (plain.logits[0] - out.logits[0]).abs().max() > 1e-3


def test_a_left_padded_batch_with_cls_among_the_features():
    """Sample 0 holds 3 padding positions; the features keep CLS (strategy "full"), which is never merged."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(5, 5), vision_layers=2,
                                feature_strategy="full")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, :3] = 0
    inputs["input_ids"][0, :3] = 0
    vision, llm = ToMe(r=2), FastV(layer=2, keep=0.5)
    fast = tokensparse.compile(model, Config(vision=vision, llm=llm, inductor=False))
    out = generate_without_warnings(fast, **inputs, max_new_tokens=10, **LOGGED)
    assert_equals_oracle(out, masked_generate(model, inputs, llm, vision=vision, max_new_tokens=10, **LOGGED))
    # 10 text + CLS + 16 - 2 x 2 merged patches; FastV keeps 6 of those 13 image tokens from layer 2
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [23 + 9] * 2 + [16 + 9] * 2


def test_with_a_kv_policy_after_both():
    """Config(vision=, llm=, kv=) applies all three: SnapKV evicts from the caches the tower and FastV
    shortened, equal to the evicting reference run inside the oracle's masks."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    config = Config(vision=ToMe(r=3), llm=FastV(layer=2, keep=0.5), kv=SnapKV(budget=12, window=2), inductor=False)
    out = generate_without_warnings(tokensparse.compile(model, config), **inputs, max_new_tokens=20, **LOGGED)
    with torch.no_grad(), _applied(model, inputs, config.llm, config.vision):
        reference, _ = evicted_generate(model, inputs, config.kv, max_new_tokens=20, **LOGGED)
    assert_equals_oracle(out, reference)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [12 + 19] * 4


def test_nothing_to_prune_and_text_only_prompts_equal_the_model():
    """r=0 with keep=1.0 is bit-identical to the unmodified model; a text-only prompt (decode steps too) has
    no tower and compiles unchanged, without a warning."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    for config, prompt in [(Config(vision=ToMe(r=0), llm=FastV(layer=2, keep=1.0), inductor=False), inputs),
                           (Config(vision=ToMe(r=3), inductor=False), {"input_ids": inputs["input_ids"][:, :3]})]:
        out = generate_without_warnings(tokensparse.compile(model, config), **prompt, max_new_tokens=6, **LOGGED)
        plain = model.generate(**prompt, max_new_tokens=6, **LOGGED)
        assert torch.equal(out.sequences, plain.sequences)
        assert all(torch.equal(got, want) for got, want in zip(out.logits, plain.logits))


def test_a_block_past_the_feature_layer_is_refused_with_the_reason():
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    fast = tokensparse.compile(model, Config(vision=TopK(layers=(2,), keep=0.5), inductor=False))
    with torch.no_grad(), pytest.raises(Exception, match=r"block 2 is past.*the vision tower's blocks up to "
                                                         r"model.vision_tower.encoder.layers.1"):
        fast.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_a_tower_outside_the_compiled_graph_warns_and_runs_unchanged():
    """LLaVA-OneVision's anyres tower runs before the prefill, outside the compiled forward: nothing to act on."""
    model, inputs = build_llava_onevision()
    fast = tokensparse.compile(model, Config(vision=ToMe(r=2), inductor=False))
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pytest.warns(tokensparse.TokensparseWarning, match="the tower ran outside it"):
        out = fast.generate(**inputs, **settings)
    assert torch.equal(out, model.generate(**inputs, **settings))


def test_explain_shows_the_tower_and_the_decoder_layers():
    """explain(): the decoder layers' token counts after both cuts, what the tower did, and a FLOPs-ideal
    speedup above FastV's alone (the tower's own blocks and every decoder layer see fewer tokens)."""
    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5), vision_layers=3, feature_layer=-2)
    both = tokensparse.explain(model, inputs, config=Config(vision=ToMe(r=3), llm=FastV(layer=2, keep=0.5)))
    alone = tokensparse.explain(model, inputs, config=Config(llm=FastV(layer=2, keep=0.5)))
    assert [(row.tokens_before, row.tokens_after) for row in both.blocks] == [(24, 18), (24, 18), (24, 13), (24, 13)]
    assert [row.acted for row in both.blocks] == [True, False, True, False]
    merged = "vision tower: model.vision_tower.encoder.layers.1: merge 3 of 14"
    assert any(line.startswith(merged) for line in both.found)
    assert not any("model.language_model.layers" in note for note in both.notes)
    assert both.flops_ideal_ratio > alone.flops_ideal_ratio > 1
