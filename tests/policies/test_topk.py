"""Attention-rank pruning against scores from the materialised attention matrix."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torch._dynamo.source import LocalSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from tokensparse.policies.topk import TopK, attention_received, kept_count, prune_tokens, topk_step


def full_attention(q, k, scale, mask=None):
    logits = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits + mask
    return logits.softmax(-1)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), tokens=st.integers(2, 40),
       protected=st.integers(0, 2), chunk=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_scores_equal_materialised_attention(batch, heads, tokens, protected, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads, tokens, 8, generator=gen, dtype=torch.float64)
    attn = full_attention(q, k, 0.3)
    want = attn[:, :, 0].mean(1) if protected else attn.mean(2).mean(1)
    got = attention_received(q, k, 0.3, protected, query_chunk=chunk)
    torch.testing.assert_close(got, want[:, protected:])


def test_scores_with_grouped_kv_heads_and_masks():
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.zeros(2, 1, 1, 6)
    mask[..., 3] = -float("inf")
    got = attention_received(q, k, 0.5, 0, mask)
    want = full_attention(q, k.repeat_interleave(2, dim=1), 0.5, mask).mean(2).mean(1)
    torch.testing.assert_close(got, want)
    assert got[:, 3].eq(0).all()
    bool_mask = mask == 0
    torch.testing.assert_close(attention_received(q, k, 0.5, 0, bool_mask), want)


def test_prune_keeps_best_in_original_order_and_prefix():
    x = torch.arange(2 * 7 * 1, dtype=torch.float32).reshape(2, 7, 1)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.5], [0.6, 0.1, 0.2, 0.3, 0.9, 0.0]])
    out = prune_tokens(x, scores, keep=3, protected=1, fuse=False)
    assert out[0, :, 0].tolist() == [0, 2, 4, 6]   # prefix, then tokens 1, 3, 5 of the rest
    assert out[1, :, 0].tolist() == [7, 8, 11, 12]


def test_fuse_appends_the_dropped_tokens_weighted_by_their_scores():
    """EViT's fused token: weights as they are (0.1 + 0.1 of the attention), not renormalised to a mean."""
    x = torch.randn(1, 5, 3)
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    out = prune_tokens(x, scores, keep=2, protected=1, fuse=True)
    dropped = x[0, [2, 4]]
    torch.testing.assert_close(out[0, -1], 0.1 * dropped[0] + 0.1 * dropped[1])
    assert out.shape == (1, 4, 3)


def test_fused_token_equals_evit_from_the_attention_probabilities():
    """From q and k: the CLS row of softmax(q k^T * scale), mean over heads, weights the inattentive tokens."""
    generator = torch.Generator().manual_seed(3)
    x, q, k = (torch.randn(2, 9, 4, generator=generator, dtype=torch.float64),
               torch.randn(2, 2, 9, 4, generator=generator, dtype=torch.float64),
               torch.randn(2, 2, 9, 4, generator=generator, dtype=torch.float64))
    out = topk_step(x, q, k, 0.5, keep=4, protected=1, fuse=True)
    attention = ((q @ k.transpose(-1, -2)) * 0.5).softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)     # [B, 8]
    for sample in range(2):
        kept = attention[sample].topk(4).indices
        dropped = [i for i in range(8) if i not in kept.tolist()]
        want = sum(attention[sample, i] * x[sample, 1 + i] for i in dropped)
        torch.testing.assert_close(out[sample, -1], want)


def test_keep_all_is_identity():
    x = torch.randn(2, 9, 4)
    q, k = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    out = topk_step(x, q, k, 0.5, kept_count(9, 1, 1.0), 1, False)
    torch.testing.assert_close(out, x)


def test_kept_count():
    assert kept_count(197, 1, 0.7) == 138
    assert kept_count(197, 1, 1.0) == 196
    assert kept_count(5, 1, 0.01) == 1
    assert kept_count(11, 1, 0.1) == 1          # 0.1 as written, not its binary float (a hair above 1/10)
    assert kept_count(4, 0, 1e-9) == 1          # below 10^-6: the float's own fraction, still at least 1


@given(patches=st.integers(1, 4096), keep=st.sampled_from([0.05, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 0.999, 1.0]))
def test_kept_count_is_the_ceiling_and_holds_for_a_symbolic_count(patches, keep):
    exact = Fraction(keep).limit_denominator(10**6) * patches
    assert kept_count(patches + 1, 1, keep) == math.ceil(exact)
    shape_env = ShapeEnv()
    symbol = shape_env.create_symbol(patches + 1, source=LocalSource("tokens"), dynamic_dim=DimDynamic.DYNAMIC)
    tokens = shape_env.create_symintnode(symbol, hint=patches + 1)
    symbolic = kept_count(tokens, 1, keep)
    assert isinstance(symbolic, torch.SymInt)
    assert symbolic.node.expr.xreplace({tokens.node.expr: patches + 1}) == math.ceil(exact)


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": 0.0}, r"keep=0.0 is out of range: it must be in \(0, 1\]"),
    ({"keep": 1.5}, "keep=1.5 is out of range"),
    ({"layers": [-1]}, "layers=-1 is out of range"),
    ({"layers": []}, "layers=.. is empty"),
    ({"layers": [2, 2]}, "repeats"),
    ({"fuse": "yes"}, "fuse='yes'"),
])
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopK(**kwargs)


def test_layer_past_depth():
    with pytest.raises(ValueError, match="block 12 is past the model's depth"):
        TopK(layers=[3, 12]).check_depth(12)
