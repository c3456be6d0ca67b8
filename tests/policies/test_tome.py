"""ToMe's merge math against a naive per-sample loop, and its option checks."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tokensparse.policies.tome import ToMe, bipartite_soft_matching, capped_r, merge_tokens, size_bias, tome_step


def naive_tome(x, size, metric, r, protected):
    """Per sample, plain Python: cosine-match A=even to B=odd (after the prefix), merge the r best."""
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        m = metric[b, protected:]
        m = m / m.norm(dim=-1, keepdim=True)
        a_ids = list(range(0, m.shape[0], 2))
        b_ids = list(range(1, m.shape[0], 2))
        best = []
        for i in a_ids:
            sims = [float(m[i] @ m[j]) for j in b_ids]
            j = max(range(len(b_ids)), key=lambda t: (sims[t], -t))
            best.append((sims[j], i, b_ids[j]))
        order = sorted(range(len(best)), key=lambda t: -best[t][0])  # stable: ties keep A order
        merged = {best[t][1]: best[t][2] for t in order[:r]}
        rest_x, rest_s = x[b, protected:], size[b, protected:]
        acc = {j: (rest_x[j] * rest_s[j], rest_s[j].clone()) for j in b_ids}
        for i, j in merged.items():
            acc[j] = (acc[j][0] + rest_x[i] * rest_s[i], acc[j][1] + rest_s[i])
        tokens = [x[b, :protected]] + [rest_x[i:i + 1] for i in a_ids if i not in merged]
        sizes = [size[b, :protected]] + [rest_s[i:i + 1] for i in a_ids if i not in merged]
        tokens += [(acc[j][0] / acc[j][1])[None] for j in b_ids]
        sizes += [acc[j][1][None] for j in b_ids]
        out_x.append(torch.cat(tokens))
        out_s.append(torch.cat(sizes))
    return torch.stack(out_x), torch.stack(out_s)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(3, 24), channels=st.integers(1, 8),
       protected=st.integers(0, 2), r=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_merge_matches_naive_loop(batch, tokens, channels, protected, r, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=gen).double()
    metric = torch.randn(batch, tokens, 4, generator=gen, dtype=torch.float64)
    r = capped_r(r, tokens, protected)
    if r == 0:
        out_x, out_s = tome_step(x, size, metric[:, None], r, protected)
        assert out_x is x and out_s is size
        return
    src, dst, unm = bipartite_soft_matching(metric, r, protected)
    got_x, got_s = merge_tokens(x, size, src, dst, unm, protected)
    want_x, want_s = naive_tome(x, size, metric, r, protected)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_s, want_s)
    assert got_x.shape[1] == tokens - r
    torch.testing.assert_close(got_s.sum(1), size.sum(1))  # no patch is lost or counted twice


def test_prefix_tokens_stay_in_front_and_unchanged():
    x = torch.randn(2, 11, 5)
    keys = torch.randn(2, 3, 11, 4)
    out, size = tome_step(x, torch.ones(2, 11, 1), keys, r=4, protected=2)
    torch.testing.assert_close(out[:, :2], x[:, :2])
    assert size[:, :2].eq(1).all() and out.shape == (2, 7, 5)


def test_matching_with_nothing_chosen_only_reorders():
    x = torch.randn(3, 9, 6)
    src, dst, unm = bipartite_soft_matching(torch.randn(3, 9, 4), 0, 0)
    out, size = merge_tokens(x, torch.ones(3, 9, 1), src, dst, unm, 0)
    order = list(range(0, 9, 2)) + list(range(1, 9, 2))  # A tokens, then B tokens
    torch.testing.assert_close(out, x[:, order])
    assert size.eq(1).all()


def test_capped_r_is_half_of_mergeable_tokens():
    assert capped_r(13, 197, 1) == 13
    assert capped_r(200, 197, 1) == 98
    assert capped_r(5, 3, 2) == 0


def test_size_bias_is_log_size_on_keys():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = size_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.tensor([0.0, math.log(2), math.log(4)]))


def test_schedules():
    assert ToMe(r=13).r_per_block(12) == [13] * 12
    decreasing = ToMe(r=8, schedule="decreasing").r_per_block(5)
    assert decreasing[0] == 16 and decreasing[-1] == 0 and decreasing == sorted(decreasing, reverse=True)
    assert ToMe(r=[1, 2, 3]).r_per_block(3) == [1, 2, 3]
    with pytest.raises(ValueError, match="r has 3 entries"):
        ToMe(r=[1, 2, 3]).r_per_block(4)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": -1}, "r=-1 is out of range"),
    ({"r": 1.5}, "r=1.5 must be an integer"),
    ({"r": [2, -3]}, "r=-3 is out of range"),
    ({"schedule": "cosine"}, "schedule='cosine' is not one of"),
    ({"prefix_tokens": -2}, "prefix_tokens=-2"),
])
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ToMe(**kwargs)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(4, 60), r=st.integers(1, 30), prefix=st.sampled_from([0, 1, 2, 5]),
       seed=st.integers(0, 2 ** 16))
def test_accumulating_merge_equals_the_scatter_form(tokens, r, prefix, seed):
    """The merge Inductor compiles (index_put accumulate) and the reference's scatter_reduce: the same sums,
    with several A tokens merging into one B token (duplicated tokens)."""
    from tokensparse.policies.tome import accumulating_merge, capped_r, tome_step

    generator = torch.Generator().manual_seed(seed)
    tokens = max(tokens, prefix + 2)
    x = torch.randn(2, tokens, 5, generator=generator, dtype=torch.float64)
    x[:, prefix + 2:: 3] = x[:, prefix + 1: prefix + 2]          # many A tokens find the same B token
    size = torch.randint(1, 4, (2, tokens, 1), generator=generator).double()
    keys = x[:, None, :, :4].expand(2, 2, tokens, 4).clone()
    r = capped_r(r, tokens, prefix)
    want = tome_step(x, size, keys, r, prefix)
    got = tome_step(x, size, keys, r, prefix, merge=accumulating_merge)
    torch.testing.assert_close(got, want)


@settings(max_examples=50, deadline=None)
@given(tokens=st.integers(2, 60), batch=st.integers(1, 3), seed=st.integers(0, 2**16), data=st.data())
def test_the_unmerged_tokens_come_out_in_token_order_as_a_sort_gives_them(tokens, batch, seed, data):
    from tokensparse.policies.tome import _unranked_in_order

    r = data.draw(st.integers(0, tokens))
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)])
    assert torch.equal(_unranked_in_order(order, r), order[:, r:].sort(dim=1).values)
