"""Sliding windows over the positions an evicted cache holds: the window mask against a loop over every query,
key and head, and H2O's column sums within it against a dense reference."""

import math

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from tokensparse.fx.passes.evict_kv import last_entries
from tokensparse.fx.passes.sliding_positions import window_mask
from tokensparse.policies.kv_policy import attention_column_sums
from tokensparse.runtime.ops import ATTENTION_COLUMN_SUMS


def _held_positions(batch: int, kv_heads: int, held: int, queries: int, seen: int, seed: int) -> torch.Tensor:
    """[B, H_kv, held + queries]: per head an ascending choice of held positions out of `seen`, then the queries'."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(seen, generator=generator)[:held].sort().values
                          for _ in range(batch * kv_heads)]).view(batch, kv_heads, held)
    own = torch.arange(seen, seen + queries).expand(batch, kv_heads, queries)
    return torch.cat([chosen, own], dim=-1)


def _loop_allowed(positions, heads, queries, window, causal=True):
    """Keys within each query's window by position; `causal`: and not after it (a mask given by the model says
    that itself, and may let a query see later keys: an image's tokens both ways)."""
    batch, kv_heads, length = positions.shape
    allowed = torch.zeros(batch, heads, queries, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(queries):
                at = int(positions[b, h // (heads // kv_heads), length - queries + i])
                for j in range(length):
                    key = int(positions[b, h // (heads // kv_heads), j])
                    allowed[b, h, i, j] = at - window < key and (key <= at or not causal)
    return allowed


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), group=st.sampled_from([1, 2]), held=st.integers(1, 12), queries=st.integers(1, 4),
       extra=st.integers(0, 20), window=st.integers(1, 16), seed=st.integers(0, 2 ** 16))
def test_the_window_mask_equals_a_loop_over_queries_and_keys(batch, group, held, queries, extra, window, seed):
    positions = _held_positions(batch, 2, held, queries, held + extra, seed)
    q = torch.zeros(batch, 2 * group, queries, 8)
    want = _loop_allowed(positions, 2 * group, queries, window)
    assert torch.equal(window_mask(None, positions, q, window), want)
    # A model's own mask (here random: padding, two-way blocks) keeps what it hides and what it shows beyond the
    # query's position; the window only takes away keys too far back.
    within = _loop_allowed(positions, 2 * group, queries, window, causal=False)
    padding = torch.rand(batch, 1, queries, held + queries, generator=torch.Generator().manual_seed(seed)) < 0.3
    assert torch.equal(window_mask(~padding, positions, q, window), within & ~padding)
    additive = torch.zeros(batch, 1, queries, held + queries).masked_fill(padding, torch.finfo(torch.float32).min)
    narrowed = window_mask(additive, positions, q, window)
    assert torch.equal(narrowed == 0, within & ~padding)


def _dense_column_sums(q, keys, scale, positions, window):
    """softmax over each query's window by position (causal by position), summed over queries, mean per group."""
    batch, heads, queries, _ = q.shape
    kv_heads = keys.shape[1]
    logits = q.float() @ keys.float().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * scale
    allowed = window_mask(None, positions, q, window)
    probabilities = logits.masked_fill(~allowed, -math.inf).softmax(dim=-1)
    return probabilities.sum(dim=2).view(batch, kv_heads, heads // kv_heads, -1).mean(dim=2)


@settings(max_examples=25, deadline=None)
@given(held=st.integers(1, 40), queries=st.sampled_from([1, 3, 70]), extra=st.integers(0, 30),
       window=st.integers(1, 24), seed=st.integers(0, 2 ** 16))
def test_h2o_column_sums_within_the_window_equal_the_dense_attention(held, queries, extra, window, seed):
    generator = torch.Generator().manual_seed(seed)
    positions = _held_positions(2, 2, held, queries, held + extra, seed)
    q = torch.randn(2, 4, queries, 8, generator=generator)
    keys = torch.randn(2, 2, held + queries, 8, generator=generator)
    got = ATTENTION_COLUMN_SUMS(q, keys, 0.35, None, positions, window)
    torch.testing.assert_close(got, _dense_column_sums(q, keys, 0.35, positions, window))
    whole = attention_column_sums(q, keys, 0.35, None, positions, 10 ** 6)     # a window past every position
    torch.testing.assert_close(whole, attention_column_sums(q, keys, 0.35))


def test_the_column_sums_op_with_positions_passes_opcheck():
    q, keys = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 9, 8)
    positions = _held_positions(2, 2, 6, 3, 12, 0)
    torch.library.opcheck(ATTENTION_COLUMN_SUMS, (q, keys, 0.35, None, positions, 5))


def test_a_sliding_layer_stores_the_last_entries_of_what_it_keeps():
    stored = torch.arange(2 * 3 * 7).view(2, 3, 7)
    assert torch.equal(last_entries(stored, 4), stored[..., 3:])
    assert torch.equal(last_entries(stored, 9), stored)
    keys = torch.randn(1, 2, 5, 4)
    assert torch.equal(last_entries(keys, 2), keys[:, :, 3:])
