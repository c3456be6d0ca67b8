"""The tokensparse:: custom ops: opcheck (schema, fake kernel, autograd registration) and equality with
the policies' reference functions."""

import pytest
import torch

from tokensparse.policies.tome import tome_step
from tokensparse.policies.topk import topk_step
from tokensparse.runtime.ops import TOME_MERGE, TOPK_PRUNE


def _tome_args(batch=2, tokens=11, channels=6, heads=3, r=3, protected=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen)
    size = torch.randint(1, 3, (batch, tokens, 1), generator=gen).float()
    keys = torch.randn(batch, heads, tokens, 4, generator=gen)
    return x, size, keys, r, protected


def _topk_args(batch=2, tokens=11, channels=6, heads=2, keep=4, protected=1, fuse=True, mask=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen)
    q = torch.randn(batch, heads, tokens, 4, generator=gen)
    k = torch.randn(batch, heads, tokens, 4, generator=gen)
    attn_mask = torch.zeros(batch, 1, 1, tokens) if mask else None
    return x, q, k, 0.5, keep, protected, fuse, attn_mask


@pytest.mark.parametrize("kwargs", [{}, {"r": 0}, {"protected": 0, "tokens": 8}, {"batch": 1, "r": 5}])
def test_tome_merge_opcheck_and_reference(kwargs):
    args = _tome_args(**kwargs)
    torch.library.opcheck(TOME_MERGE, args)
    got = TOME_MERGE(*args)
    want = tome_step(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kwargs", [{}, {"fuse": False}, {"protected": 0, "mask": True}, {"batch": 3, "keep": 10}])
def test_topk_prune_opcheck_and_reference(kwargs):
    args = _topk_args(**kwargs)
    torch.library.opcheck(TOPK_PRUNE, args)
    torch.testing.assert_close(TOPK_PRUNE(*args), topk_step(*args))


@pytest.mark.parametrize("r, protected", [(3, 1), (5, 0), (0, 1)])
def test_merge_matches_opcheck_and_reference(r, protected):
    """The op that plugins="kernel" exports as TomeMergeRows: the policy's merge for given matches."""
    from tokensparse.policies.tome import bipartite_soft_matching, merge_tokens
    from tokensparse.runtime.ops import MERGE_MATCHES

    x, size, keys, _, _ = _tome_args(tokens=10)
    matches = bipartite_soft_matching(keys.mean(1), r, protected)
    args = (x, size, *(index.contiguous() for index in matches), protected)
    torch.library.opcheck(MERGE_MATCHES, args)
    for got, want in zip(MERGE_MATCHES(*args), merge_tokens(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_select_and_split_top_k_opcheck_and_reference(k):
    """The ops plugins="kernel" exports as TopKSelect and TopKSplit: indices in token order, ties to the lower."""
    from tokensparse.runtime.ops import SELECT_TOP_K, SPLIT_TOP_K

    scores = torch.randint(0, 3, (2, 9), generator=torch.Generator().manual_seed(k)).float()  # many ties
    torch.library.opcheck(SELECT_TOP_K, (scores, k))
    torch.library.opcheck(SPLIT_TOP_K, (scores, k))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    kept, rest = SPLIT_TOP_K(scores, k)
    assert torch.equal(kept, order[:, :k].sort(-1).values) and torch.equal(rest, order[:, k:].sort(-1).values)
    assert torch.equal(SELECT_TOP_K(scores, k), kept)


@pytest.mark.parametrize("keep", [0.25, 1.0, 0.0])
def test_keep_vision_tokens_opcheck_and_reference(keep):
    from tokensparse.policies.fastv import fastv_keep
    from tokensparse.runtime.ops import KEEP_VISION

    scores = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    image_mask = torch.zeros(2, 9, dtype=torch.bool)
    image_mask[:, 2:7] = True
    torch.library.opcheck(KEEP_VISION, (scores, image_mask, keep))
    kept = KEEP_VISION(scores, image_mask, keep)
    assert torch.equal(kept, fastv_keep(scores, image_mask, keep))
    assert kept.shape == (2, 4 + {0.25: 1, 1.0: 5, 0.0: 0}[keep])


def test_keep_diverse_vision_tokens_opcheck_and_reference():
    from tokensparse.policies.divprune import divprune_keep
    from tokensparse.runtime.ops import KEEP_DIVERSE

    features = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(2))
    image_mask = torch.zeros(2, 9, dtype=torch.bool)
    image_mask[:, 1:8] = True
    torch.library.opcheck(KEEP_DIVERSE, (features, image_mask, 0.5))
    assert torch.equal(KEEP_DIVERSE(features, image_mask, 0.5), divprune_keep(features, image_mask, 0.5))


@pytest.mark.parametrize("protected, contextual", [(1, 2), (0, 3), (1, 0)])
def test_visionzip_and_keep_image_rows_opcheck_and_reference(protected, contextual):
    from tokensparse.policies.topk import attention_received
    from tokensparse.policies.visionzip import image_positions_of_rows, visionzip_select
    from tokensparse.runtime.ops import KEEP_IMAGE_ROWS, VISIONZIP

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, protected + 12, 6, generator=gen)
    q, k = torch.randn(2, 2, protected + 12, 4, generator=gen), torch.randn(2, 2, protected + 12, 4, generator=gen)
    args = (hidden, q, k, 0.5, 4, contextual, protected)
    torch.library.opcheck(VISIONZIP, args)
    zipped, rows = VISIONZIP(*args)
    want = visionzip_select(hidden, attention_received(q, k, 0.5, protected), k.mean(dim=1), 4, contextual, protected)
    assert torch.equal(zipped, want[0]) and torch.equal(rows, want[1])
    assert rows.shape == (2, protected + 4 + contextual)

    image_mask = torch.zeros(2, 3 + 12 + 2, dtype=torch.bool)
    image_mask[:, 3:15] = True
    torch.library.opcheck(KEEP_IMAGE_ROWS, (image_mask, rows, protected, 12))
    kept = KEEP_IMAGE_ROWS(image_mask, rows, protected, 12)
    assert torch.equal(kept, image_positions_of_rows(image_mask, rows, protected))
    assert kept.shape == (2, 5 + 4 + contextual)
    with pytest.raises(ValueError, match="each sample holds 12 image tokens but its image has 13 features"):
        KEEP_IMAGE_ROWS(image_mask, rows, 0, 13)


@pytest.mark.parametrize("count", [5, 9, 12])
def test_snapkv_keep_and_kv_evict_opcheck(count):
    from tokensparse.policies.snapkv import snapkv_keep
    from tokensparse.runtime.ops import KV_EVICT, SNAPKV_KEEP

    gen = torch.Generator().manual_seed(count)
    q, keys, values = (torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen),
                       torch.randn(2, 2, 12, 8, generator=gen))
    args = (q, keys, 0.35, count, 3, 5, "avg")
    torch.library.opcheck(SNAPKV_KEEP, args)
    kept = SNAPKV_KEEP(*args)
    assert torch.equal(kept, snapkv_keep(*args)) and kept.shape == (2, 2, count)
    torch.library.opcheck(KV_EVICT, (keys, values, kept))
    new_keys, new_values = KV_EVICT(keys, values, kept)
    assert torch.equal(new_keys[1, 0, 2], keys[1, 0, kept[1, 0, 2]])
    assert torch.equal(new_values[0, 1, -1], values[0, 1, 11])


@pytest.mark.parametrize("queries, count", [(12, 7), (1, 12)])
def test_h2o_ops_opcheck(queries, count):
    from tokensparse.policies.h2o import h2o_keep
    from tokensparse.policies.kv_policy import attention_column_sums
    from tokensparse.runtime.ops import ATTENTION_COLUMN_SUMS, H2O_KEEP

    gen = torch.Generator().manual_seed(queries)
    q, keys = torch.randn(2, 4, queries, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    torch.library.opcheck(ATTENTION_COLUMN_SUMS, (q, keys, 0.35))
    sums = ATTENTION_COLUMN_SUMS(q, keys, 0.35)
    assert torch.equal(sums, attention_column_sums(q, keys, 0.35)) and sums.dtype == torch.float32
    torch.testing.assert_close(sums.sum(dim=-1), torch.full((2, 2), float(queries)))   # each row sums to 1
    torch.library.opcheck(H2O_KEEP, (sums, count, 3))
    kept = H2O_KEEP(sums, count, 3)
    assert torch.equal(kept, h2o_keep(sums, count, 3)) and kept.shape == (2, 2, count)



@pytest.mark.parametrize("length, count", [(13, 12), (12, 12), (20, 12)])
def test_h2o_step_keep_opcheck(length, count):
    """A decode step's cache one position over the budget, within it, and (not a decode step's) further over:
    h2o_keep's positions each time."""
    from tokensparse.policies.h2o import h2o_keep
    from tokensparse.runtime.ops import H2O_STEP_KEEP

    scores = torch.rand(2, 2, length, generator=torch.Generator().manual_seed(length))
    padding = torch.arange(length)[None, :] < torch.tensor([[0], [3]])
    torch.library.opcheck(H2O_STEP_KEEP, (scores, count, 3, padding))
    kept = H2O_STEP_KEEP(scores, count, 3, padding)
    assert torch.equal(kept, h2o_keep(scores, count, 3, padding)) and kept.shape == (2, 2, count)

@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_adaptive_keep_opcheck(tau):
    from tokensparse.policies.adaptive_kv import adaptive_keep
    from tokensparse.runtime.ops import ADAPTIVE_KEEP

    gen = torch.Generator().manual_seed(7)
    q, keys = torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    torch.library.opcheck(ADAPTIVE_KEEP, (q, keys, 0.35, tau, 3))
    kept = ADAPTIVE_KEEP(q, keys, 0.35, tau, 3)
    assert torch.equal(kept, adaptive_keep(q, keys, 0.35, tau, 3))
    assert kept.shape[-1] == 12 if tau == 1.0 else 3 <= kept.shape[-1] < 12


@pytest.mark.parametrize("saliency, temporal_rank", [(False, 0), (True, 0), (True, 2)],
                         ids=["scores", "saliency", "saliency_and_temporal_redundancy"])
def test_vision_budget_keep_opcheck(saliency, temporal_rank):
    from tokensparse.policies.vision_budget import vision_budget_keep
    from tokensparse.runtime.ops import VISION_BUDGET_KEEP

    gen = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 2:8] = True
    mask[:, 4] = not temporal_rank                         # two screenshots, 2:4 and 5:8, with temporal redundancy
    hidden = torch.randn(2, 12, 16, generator=gen) if saliency else None
    args = (q, keys, 0.35, mask, hidden, 0.5, False, 2.0, True, 2, 3, "max", 0.3 if saliency else 0.0, 1.0, None,
            temporal_rank)
    torch.library.opcheck(VISION_BUDGET_KEEP, args)
    kept = VISION_BUDGET_KEEP(*args)
    assert torch.equal(kept, vision_budget_keep(q, keys, 0.35, mask, hidden, 0.5, 2, 2, 3, "max", args[12], 1.0,
                                                None, temporal_rank))
    assert kept.shape == (2, 2, (3 if not temporal_rank else 2) + 2 + 2)


def test_the_kv_selection_ops_take_a_padded_batchs_padding():
    """opcheck with padding [B, L], and padding drawn no attention and kept last by each op."""
    from tokensparse.runtime.ops import (ADAPTIVE_KEEP, ATTENTION_COLUMN_SUMS, H2O_KEEP, SNAPKV_KEEP,
                                         VISION_BUDGET_KEEP)

    gen = torch.Generator().manual_seed(11)
    q, keys = torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, :5] = True
    image_mask = torch.zeros(2, 12, dtype=torch.bool)
    image_mask[:, 6:9] = True
    sums = ATTENTION_COLUMN_SUMS(q, keys, 0.35, padding)
    calls = [(ATTENTION_COLUMN_SUMS, (q, keys, 0.35, padding)), (SNAPKV_KEEP, (q, keys, 0.35, 6, 2, 3, "avg", padding)),
             (H2O_KEEP, (sums, 6, 2, padding)), (ADAPTIVE_KEEP, (q, keys, 0.35, 0.5, 2, padding)),
             (VISION_BUDGET_KEEP, (q, keys, 0.35, image_mask, None, 2.0, True, 2.0, True, 2, 3, "avg", 0.0, 1.0,
                                   padding))]
    for op, args in calls:
        torch.library.opcheck(op, args)
    assert not sums[0, :, :5].any() and bool((sums[1] > 0).all())
    for op, args in calls[1:]:
        kept = op(*args)
        assert bool((kept[0] >= 5).all())               # sample 0 has 7 real positions, more than any count here


def test_tokens_as_symbol_opcheck_and_inlined_form():
    from tokensparse.policies.token_axis import same_tokens
    from tokensparse.runtime.ops import TOKENS_AS_SYMBOL

    x = torch.randn(2, 7, 5)
    torch.library.opcheck(TOKENS_AS_SYMBOL, (x,))
    assert torch.equal(TOKENS_AS_SYMBOL(x), x) and same_tokens(x) is x
