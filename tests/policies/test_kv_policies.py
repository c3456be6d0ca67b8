"""SnapKV's, StreamingLLM's and H2O's selections against plain loop references, and their option checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse import H2O, AdaptiveKV, KeyNorm, SnapKV, StreamingLLM, VisionBudget
from tokensparse.policies import kv_policy
from tokensparse.policies.adaptive_kv import adaptive_keep
from tokensparse.policies.h2o import h2o_keep, h2o_step_keep
from tokensparse.policies.key_norm import key_norm_keep
from tokensparse.policies.kv_policy import attention_column_sums
from tokensparse.policies.snapkv import snapkv_keep, snapkv_scores
from tokensparse.policies.streamingllm import streaming_keep, streaming_step_keep
from tokensparse.policies.vision_budget import vision_budget_keep, vision_saliency


def snapkv_loops(q, keys, scale, count, window, kernel, pooling):
    """One (sample, KV head) at a time, one window query at a time."""
    batch, heads, _, _ = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    window = min(window, length, q.shape[2])
    kept = torch.empty(batch, kv_heads, count, dtype=torch.int64)
    for b in range(batch):
        for h in range(kv_heads):
            scores = [0.0] * (length - window)
            for head in range(h * group, (h + 1) * group):
                for row in range(window):
                    position = length - window + row
                    logits = [float(q[b, head, q.shape[2] - window + row] @ keys[b, h, j]) * scale
                              for j in range(position + 1)]
                    top = max(logits)
                    weights = [math.exp(x - top) for x in logits]
                    for j in range(length - window):
                        scores[j] += weights[j] / sum(weights) / group
            pooled = []
            for j in range(length - window):
                near = [scores[i] if 0 <= i < length - window else 0.0 for i in range(j - kernel // 2, j + kernel // 2 + 1)]
                inside = [scores[i] for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < length - window]
                pooled.append(max(inside) if pooling == "max" else sum(near) / kernel)
            order = sorted(range(length - window), key=lambda j: (-pooled[j], j))
            chosen = sorted(order[: count - window]) + list(range(length - window, length))
            kept[b, h] = torch.tensor(chosen)
    return kept


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 2), length=st.integers(6, 20),
       window=st.integers(1, 5), extra=st.integers(0, 6), kernel=st.sampled_from([1, 3, 5]),
       pooling=st.sampled_from(["avg", "max"]), seed=st.integers(0, 1000))
def test_snapkv_keep_equals_the_loop_reference(batch, kv_heads, group, length, window, extra, kernel, pooling, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, 8, generator=generator)
    keys = torch.randn(batch, kv_heads, length, 8, generator=generator)
    count = min(length, window + extra)
    got = snapkv_keep(q, keys, 0.35, count, window, kernel, pooling)
    assert torch.equal(got, snapkv_loops(q, keys, 0.35, count, window, kernel, pooling))


def column_sums_loops(q, keys, scale):
    """Each query's causal softmax row, one (sample, head, query) at a time, added to its KV group's sums."""
    batch, heads, queries, _ = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    sums = torch.zeros(batch, kv_heads, length, dtype=torch.float64)
    for b in range(batch):
        for head in range(heads):
            for row in range(queries):
                position = length - queries + row
                logits = (keys[b, head // group, : position + 1].double() @ q[b, head, row].double()) * scale
                sums[b, head // group, : position + 1] += logits.softmax(dim=0) / group
    return sums


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 3), past=st.integers(0, 12),
       queries=st.integers(1, 9), chunk=st.integers(1, 4), seed=st.integers(0, 1000))
def test_attention_column_sums_equal_the_loop_reference(batch, kv_heads, group, past, queries, chunk, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, queries, 8, generator=generator)
    keys = torch.randn(batch, kv_heads, past + queries, 8, generator=generator)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kv_policy, "QUERY_CHUNK", chunk)               # the query blocks add up to the whole
        got = attention_column_sums(q, keys, 0.35)
    torch.testing.assert_close(got.double(), column_sums_loops(q, keys, 0.35), rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), length=st.integers(1, 24), heavy=st.integers(0, 8),
       recent=st.integers(1, 8), seed=st.integers(0, 1000))
def test_h2o_keep_holds_the_heavy_hitters_and_the_recent_window(batch, kv_heads, length, heavy, recent, seed):
    scores = torch.rand(batch, kv_heads, length, generator=torch.Generator().manual_seed(seed))
    count = H2O(heavy=heavy, recent=recent).kept_count(length)
    kept = h2o_keep(scores, count, recent)
    assert kept.shape == (batch, kv_heads, count)
    tail = min(recent, count)
    for b in range(batch):
        for h in range(kv_heads):
            before = sorted(range(length - tail), key=lambda j: (-float(scores[b, h, j]), j))[: count - tail]
            assert kept[b, h].tolist() == sorted(before) + list(range(length - tail, length))



@settings(max_examples=60, deadline=None)
@given(heavy=st.integers(0, 5), recent=st.integers(1, 5), over=st.booleans(), short=st.integers(0, 3),
       paddings=st.lists(st.integers(0, 12), min_size=1, max_size=3), ties=st.booleans(), seed=st.integers(0, 1000))
def test_h2o_step_keep_equals_h2o_keep(heavy, recent, over, short, paddings, ties, seed):
    """A decode step's cache (within the budget, or one position over it), padding first, scores with and without
    ties: the sort- and branch-free form keeps what h2o_keep keeps."""
    budget = heavy + recent
    length = budget + 1 if over else max(1, budget - short)
    scores = torch.rand(len(paddings), 2, length, generator=torch.Generator().manual_seed(seed))
    if ties:
        scores = (scores * 3).floor()
    padding = torch.arange(length)[None, :] < torch.tensor(paddings)[:, None]
    count = min(length, budget)
    assert torch.equal(h2o_step_keep(scores, count, recent, padding), h2o_keep(scores, count, recent, padding))
    assert torch.equal(h2o_step_keep(scores, count, recent), h2o_keep(scores, count, recent))

@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 2), length=st.integers(2, 20),
       window=st.integers(1, 5), tau=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_adaptive_keep_is_the_fewest_positions_holding_tau(batch, kv_heads, group, length, window, tau, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, 8, generator=generator) * 2
    keys = torch.randn(batch, kv_heads, length, 8, generator=generator)
    kept = adaptive_keep(q, keys, 0.35, tau, window)
    window = min(window, length)
    mass = column_sums_loops(q[:, :, -window:], keys, 0.35)
    needed = 0                                  # per (sample, head): window + the fewest best positions before it
    for b in range(batch):
        for h in range(kv_heads):
            order = sorted(range(length - window), key=lambda j: (-float(mass[b, h, j]), j))
            held, count = float(mass[b, h, length - window:].sum()), 0
            while held < tau * float(mass[b, h].sum()) - 1e-6 and count < len(order):
                held, count = held + float(mass[b, h, order[count]]), count + 1
            needed = max(needed, count)
    assert abs(kept.shape[-1] - (window + needed)) <= 1          # float32 against float64 at the boundary
    for b in range(batch):
        for h in range(kv_heads):
            before = kept[b, h, : kept.shape[-1] - window].tolist()
            assert kept[b, h, kept.shape[-1] - window:].tolist() == list(range(length - window, length))
            best = sorted(range(length - window), key=lambda j: (-float(mass[b, h, j]), j))[: len(before)]
            assert set(before) == set(best) or torch.allclose(mass[b, h, sorted(best)].sum(), mass[b, h, before].sum())


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), group=st.integers(1, 2), length=st.integers(2, 24), window=st.integers(1, 6),
       tau=st.floats(0.05, 1.0), pads=st.integers(0, 4), seed=st.integers(0, 1000))
def test_adaptive_keep_equals_its_sort_form(batch, group, length, window, tau, pads, seed):
    """The rank-and-nonzero selection (count never read into Python, so ONNX traces it) keeps what the sort form
    keeps: the window and each head's count - window best positions before it, padding last."""
    from tokensparse.policies.adaptive_kv import needed_before_window

    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 2 * group, length, 8, generator=generator) * 2
    keys = torch.randn(batch, 2, length, 8, generator=generator)
    padding = None
    if pads:
        padding = torch.zeros(batch, length, dtype=torch.bool)
        padding[0, : min(pads, length - 1)] = True
    shown = min(window, length)
    mass = attention_column_sums(q[:, :, -shown:], keys, 0.35, padding)
    count = shown + int(needed_before_window(mass, shown, tau))
    assert torch.equal(adaptive_keep(q, keys, 0.35, tau, window, padding),
                       kv_policy.best_and_recent(mass, length, count, shown, padding))


def test_adaptive_keeps_more_for_a_larger_tau():
    generator = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 4, 30, 8, generator=generator), torch.randn(2, 2, 30, 8, generator=generator)
    counts = [adaptive_keep(q, keys, 0.35, tau, 4).shape[-1] for tau in (0.2, 0.5, 0.8, 1.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1] == 30


def _vision_inputs(seed=0, batch=2, length=24, images=(4, 16)):
    generator = torch.Generator().manual_seed(seed)
    q, keys = torch.randn(batch, 4, length, 8, generator=generator), torch.randn(batch, 2, length, 8, generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, images[0]:images[1]] = True
    return q, keys, mask, torch.randn(batch, length, 16, generator=generator)


@pytest.mark.parametrize("vision, text, want", [(4, 1.0, (4, 10)), (0.5, 3, (6, 3)), (0, 2, (0, 2)), (99, 99, (12, 10))])
def test_vision_budget_keeps_each_kinds_budget_and_the_window(vision, text, want):
    q, keys, mask, _ = _vision_inputs()
    kept = vision_budget_keep(q, keys, 0.35, mask, None, vision, text, window=2)
    scores = snapkv_scores(q[:, :, -2:], keys, 0.35)
    assert kept.shape == (2, 2, sum(want) + 2)
    for b in range(2):
        for h in range(2):
            chosen = kept[b, h, :-2]
            assert kept[b, h, -2:].tolist() == [22, 23] and chosen.tolist() == sorted(chosen.tolist())
            for kind, count in zip((mask[b, :22], ~mask[b, :22]), want):
                positions = kind.nonzero()[:, 0].tolist()
                best = sorted(positions, key=lambda j: (-float(scores[b, h, j]), j))[:count]
                assert sorted(best) == [j for j in chosen.tolist() if kind[j]]


def test_vision_saliency_ranks_vision_positions_by_hidden_norm():
    q, keys, mask, hidden = _vision_inputs(seed=3)
    hidden[:, 4:16] *= 2.0 ** torch.arange(12).float()[:, None]          # norms grow along the image
    kept = vision_budget_keep(q, keys, 0.35, mask, hidden, 3, 1.0, window=2, alpha=1e6, temperature=1e4)
    assert all(kept[b, h, :-2][mask[b, kept[b, h, :-2]]].tolist() == [13, 14, 15] for b in range(2) for h in range(2))
    saliency = vision_saliency(hidden, mask, 0.5)
    torch.testing.assert_close(saliency.sum(dim=-1), torch.ones(2))
    assert bool((saliency[~mask] == 0).all())


def test_vision_budget_without_images_treats_every_position_as_text():
    q, keys, _, _ = _vision_inputs()
    kept = vision_budget_keep(q, keys, 0.35, None, None, 4, 5, window=2)
    assert kept.shape == (2, 2, 7)


def test_vision_budget_needs_equal_image_counts():
    q, keys, mask, _ = _vision_inputs()
    mask[1, 3] = True
    with pytest.raises(ValueError, match=r"same number of vision positions in every sample; this batch holds \[12, 13\]"):
        vision_budget_keep(q, keys, 0.35, mask, None, 4, 1.0, window=2)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), length=st.integers(1, 24), budget=st.integers(1, 24),
       window=st.integers(0, 6), seed=st.integers(0, 1000))
def test_key_norm_keep_holds_the_lowest_norms_and_the_window(batch, kv_heads, length, budget, window, seed):
    keys = torch.randn(batch, kv_heads, length, 8, generator=torch.Generator().manual_seed(seed))
    budget = max(budget, window)                  # a count below the window is refused (test below)
    count = KeyNorm(budget=budget, window=window).kept_count(length)
    kept = key_norm_keep(keys, count, window)
    tail = min(window, count)
    for b in range(batch):
        for h in range(kv_heads):
            norms = [float(keys[b, h, j].double().norm()) for j in range(length)]
            before = sorted(range(length - tail), key=lambda j: (norms[j], j))[: count - tail]
            assert kept[b, h].tolist() == sorted(before) + list(range(length - tail, length))


def test_streaming_keep_holds_sinks_and_the_recent_window():
    kept = streaming_keep(torch.zeros(2, 3, 10, 4), sinks=2, window=3)
    assert kept.shape == (2, 3, 5) and kept[1, 2].tolist() == [0, 1, 7, 8, 9]
    # count = min(L, sinks + window), as after FastV where L is data-dependent: a short cache keeps everything
    assert streaming_keep(torch.zeros(1, 1, 10, 4), 2, 3, count=5)[0, 0].tolist() == [0, 1, 7, 8, 9]
    assert streaming_keep(torch.zeros(1, 1, 4, 4), 2, 3, count=4)[0, 0].tolist() == [0, 1, 2, 3]



@settings(max_examples=60, deadline=None)
@given(sinks=st.integers(0, 4), window=st.integers(1, 6), short=st.integers(0, 3), over=st.booleans(),
       paddings=st.lists(st.integers(0, 12), min_size=1, max_size=3))
def test_streaming_step_keep_equals_streaming_keep(sinks, window, short, over, paddings):
    """A decode step's cache (within the budget, or one position over it) with padding first: the branch- and
    sort-free form keeps what streaming_keep keeps."""
    length = sinks + window + 1 if over else max(1, sinks + window - short)
    first_real = torch.tensor([min(pads, length) for pads in paddings])
    padding = torch.arange(length)[None, :] < first_real[:, None]
    keys = torch.zeros(len(paddings), 2, length, 4)
    want = streaming_keep(keys, sinks, window, padding, count=min(length, sinks + window))
    got = streaming_step_keep(length, sinks, window, first_real)
    assert torch.equal(got[:, None, :].expand_as(want), want)

@pytest.mark.parametrize("policy", [lambda: SnapKV(budget=16), lambda: SnapKV(budget=2, window=4),
                                    lambda: KeyNorm(budget=3, window=4)])
def test_budget_below_the_window_is_refused(policy):
    """A count below the window that is always kept is a mistake, never silently raised to the window."""
    with pytest.raises(ValueError, match=r"budget=\d+ is below window=\d+"):
        policy()


def test_budget_fraction_below_the_window_keeps_exactly_the_budget():
    """The last positions only: snapkv_keep's short form, no more than the budget."""
    from tokensparse.policies.snapkv import snapkv_keep

    policy = SnapKV(budget=0.1, window=8)
    count = policy.kept_count(30)
    kept = snapkv_keep(torch.randn(1, 2, 30, 4), torch.randn(1, 2, 30, 4), 0.5, count, policy.window)
    assert count == 3 and torch.equal(kept, torch.arange(27, 30).expand(1, 2, 3))


def test_budgets():
    assert SnapKV(budget=16, window=4).kept_count(40) == 16
    assert SnapKV(budget=0.25, window=4).kept_count(40) == 10
    assert SnapKV(budget=0.05, window=4).kept_count(40) == 2       # a fraction below the window: exactly it
    assert SnapKV(budget=64).kept_count(40) == 40
    assert SnapKV(budget=16, window=4).evicts(40, 40) and not SnapKV(budget=16, window=4).evicts(1, 41)
    assert StreamingLLM(sinks=2, window=10).evicts(1, 13) and not StreamingLLM(sinks=2, window=10).evicts(1, 12)
    assert H2O(heavy=8, recent=4).evicts(1, 13) and not H2O(heavy=8, recent=4).evicts(40, 12)
    assert H2O(heavy=8, recent=4).kept_count(40) == 12 and H2O(heavy=0, recent=4).kept_count(3) == 3


@pytest.mark.parametrize("make, message", [
    (lambda: SnapKV(budget=0), "budget=0 is out of range"),
    (lambda: SnapKV(budget=1.5), "budget=1.5 is out of range"),
    (lambda: SnapKV(budget="all"), "budget='all' must be a count"),
    (lambda: SnapKV(kernel=4), "kernel=4 must be odd"),
    (lambda: SnapKV(pooling="min"), "pooling='min' is unknown"),
    (lambda: SnapKV(window=0), "window=0 is out of range"),
    (lambda: StreamingLLM(sinks=-1), "sinks=-1 is out of range"),
    (lambda: H2O(heavy=-1), "heavy=-1 is out of range"),
    (lambda: H2O(recent=0), "recent=0 is out of range"),
    (lambda: H2O(heavy=0.2), "heavy=0.2 must be an integer"),
    (lambda: AdaptiveKV(tau=0.0), "tau=0.0 is out of range"),
    (lambda: AdaptiveKV(tau=1.5), "tau=1.5 is out of range"),
    (lambda: AdaptiveKV(window=0), "window=0 is out of range"),
    (lambda: VisionBudget(vision=-1), "vision=-1 is out of range"),
    (lambda: VisionBudget(text=1.5), "text=1.5 is out of range"),
    (lambda: VisionBudget(alpha=-0.1), "alpha=-0.1 must be a number >= 0"),
    (lambda: VisionBudget(temperature=0), "temperature=0 must be a number > 0"),
    (lambda: VisionBudget(kernel=2), "kernel=2 must be odd"),
    (lambda: VisionBudget(temporal_rank=-1), "temporal_rank=-1 is out of range"),
    (lambda: VisionBudget(temporal_rank=2.5), "temporal_rank=2.5 must be an integer >= 0"),
    (lambda: KeyNorm(budget=0), "budget=0 is out of range"),
    (lambda: KeyNorm(window=-1), "window=-1 is out of range"),
])
def test_bad_options_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()
