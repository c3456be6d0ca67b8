"""The KV policies on a padded sample: what a left-padded sample keeps is what it keeps alone, shifted past
its padding; padding draws no attention, asks none, and is kept only to fill a count larger than the
sample's real positions, first (so each decode step's mask is the last columns of the mask seen)."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokensparse.policies.adaptive_kv import adaptive_keep
from tokensparse.policies.h2o import h2o_keep
from tokensparse.policies.key_norm import key_norm_keep
from tokensparse.policies.kv_policy import attention_column_sums, padded_positions
from tokensparse.policies.snapkv import snapkv_keep
from tokensparse.policies.streamingllm import streaming_keep
from tokensparse.policies.vision_budget import vision_budget_keep

SCALE = 0.35


def _padded(real: torch.Tensor, pads: int, generator) -> torch.Tensor:
    """`real` [1, H, r, d] behind `pads` positions of random values (what padding holds is arbitrary)."""
    noise = torch.randn(real.shape[0], real.shape[1], pads, real.shape[3], generator=generator) * 3
    return torch.cat([noise, real], dim=2)


def _assert_keeps(got: torch.Tensor, alone: torch.Tensor, pads: int, count: int, real: int) -> None:
    """The padded sample keeps its own selection past the padding, after count - real padding positions
    (which of them does not matter: the mask hides them all) when the count exceeds its real positions."""
    fill = max(0, count - real)
    assert got.shape[-1] == count
    assert bool((got[..., :fill] < pads).all())
    assert torch.equal(got[..., fill:], alone + pads)


def _case(seed, real, pads, kv_heads=2, group=2, dim=8):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, kv_heads * group, real, dim, generator=generator)
    keys = torch.randn(1, kv_heads, real, dim, generator=generator)
    padding = torch.arange(pads + real)[None] < pads
    return q, keys, _padded(q, pads, generator), _padded(keys, pads, generator), padding


CASES = dict(seed=st.integers(0, 10_000), real=st.integers(3, 20), pads=st.integers(0, 6), extra=st.integers(0, 8))


@settings(max_examples=20, deadline=None)
@given(**CASES, window=st.integers(1, 4), kernel=st.sampled_from([1, 3, 5]), pooling=st.sampled_from(["avg", "max"]))
@example(seed=0, real=3, pads=6, extra=0, window=4, kernel=3, pooling="avg")      # the window reaches the padding
def test_snapkv_keeps_what_the_sample_keeps_alone(seed, real, pads, extra, window, kernel, pooling):
    q, keys, padded_q, padded_keys, padding = _case(seed, real, pads)
    count = min(real + pads, window + extra)
    alone = snapkv_keep(q, keys, SCALE, min(count, real), window, kernel, pooling)
    got = snapkv_keep(padded_q, padded_keys, SCALE, count, window, kernel, pooling, padding)
    _assert_keeps(got, alone, pads, count, real)


@settings(max_examples=20, deadline=None)
@given(**CASES, window=st.integers(0, 4))
def test_key_norm_keeps_what_the_sample_keeps_alone(seed, real, pads, extra, window):
    _, keys, _, padded_keys, padding = _case(seed, real, pads)
    count = min(real + pads, max(window, 1) + extra)
    alone = key_norm_keep(keys, min(count, real), window)
    got = key_norm_keep(padded_keys, count, window, padding)
    _assert_keeps(got, alone, pads, count, real)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), real=st.integers(3, 20), pads=st.integers(0, 6), sinks=st.integers(0, 3),
       window=st.integers(1, 4))
def test_streamingllm_sinks_are_the_first_real_positions(seed, real, pads, sinks, window):
    _, keys, _, padded_keys, padding = _case(seed, real, pads)
    if real + pads <= sinks + window:
        return                                     # nothing to evict
    got = streaming_keep(padded_keys, sinks, window, padding)
    alone = streaming_keep(keys, sinks, window) if real > sinks + window else torch.arange(real).expand(1, 2, real)
    _assert_keeps(got, alone, pads, sinks + window, real)


@settings(max_examples=20, deadline=None)
@given(**CASES, recent=st.integers(1, 4))
def test_h2o_keeps_what_the_sample_keeps_alone(seed, real, pads, extra, recent):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, 2, real, generator=generator)
    padded_scores = torch.cat([torch.rand(1, 2, pads, generator=generator) * 10, scores], dim=-1)
    padding = torch.arange(pads + real)[None] < pads
    count = min(real + pads, recent + extra)
    alone = h2o_keep(scores, min(count, real), min(recent, real))
    got = h2o_keep(padded_scores, count, recent, padding)
    if count > real and recent > real:      # the recent window reaches into the padding: it keeps its padding
        alone = torch.arange(real).expand(1, 2, real)
    _assert_keeps(got, alone, pads, count, real)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), real=st.integers(3, 20), pads=st.integers(0, 6), queries=st.integers(1, 3))
def test_column_sums_skip_padding(seed, real, pads, queries):
    """Padding positions draw no attention, and padding queries (a sample shorter than the window) ask none."""
    q, keys, padded_q, padded_keys, padding = _case(seed, real, pads)
    window = min(queries, real)
    alone = attention_column_sums(q[:, :, -window:], keys, SCALE)
    got = attention_column_sums(padded_q[:, :, -queries:], padded_keys, SCALE, padding)
    if queries > real:                           # padding queries: only the real ones count
        alone = attention_column_sums(q, keys, SCALE)
    torch.testing.assert_close(got[..., pads:], alone)
    assert not got[..., :pads].any()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), real=st.integers(6, 20), pads=st.integers(0, 6), window=st.integers(1, 4),
       tau=st.floats(0.1, 0.99))
def test_adaptive_keeps_what_the_sample_keeps_alone(seed, real, pads, window, tau):
    q, keys, padded_q, padded_keys, padding = _case(seed, real, pads)
    alone = adaptive_keep(q, keys, SCALE, tau, window)
    got = adaptive_keep(padded_q, padded_keys, SCALE, tau, window, padding)
    assert torch.equal(got, alone + pads)


def test_vision_budget_keeps_padding_only_where_every_real_position_stays():
    q, keys, padded_q, padded_keys, padding = _case(seed=3, real=16, pads=4)
    image_mask = torch.zeros(1, 20, dtype=torch.bool)
    image_mask[0, 8:14] = True
    alone = vision_budget_keep(q, keys, SCALE, image_mask[:, 4:], None, 3, 4, window=2)
    got = vision_budget_keep(padded_q, padded_keys, SCALE, image_mask, None, 3, 4, window=2, padding=padding)
    assert torch.equal(got, alone + 4)
    # text=1.0 counts 12 text positions of the padded length, the sample has 8 real ones: its 4 spare text slots
    # take the 3 image tokens beyond the vision budget, and only the last spare slot the first padding position.
    everything = vision_budget_keep(padded_q, padded_keys, SCALE, image_mask, None, 3, 1.0, window=2, padding=padding)
    assert everything[0, 0].tolist() == [0, *range(4, 20)]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_padded_positions_read_the_last_querys_row(dtype):
    allowed = torch.tensor([[False, False, True, True], [True, True, True, True]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = allowed[:, None, None, :] & causal[None, None]
    if dtype is torch.float32:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(padded_positions(mask, 4), ~allowed)
    assert torch.equal(padded_positions(mask, 3), ~allowed[:, 1:])
