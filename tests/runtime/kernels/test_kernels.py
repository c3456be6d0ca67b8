"""Triton kernels against their PyTorch references: random shapes, batch > 1, odd sizes, token counts above
TensorRT's TopK limit of 3840, half precision. On CPU tensors under TRITON_INTERPRET=1 (CI), on a GPU with
TRITON_INTERPRET=0 (tests/devices.py)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.devices import KERNEL_DEVICE as DEVICE
from tokensparse.policies.tome import bipartite_soft_matching
from tokensparse.runtime.kernels import (kv_compact, kv_compact_reference, tome_merge_kernel, tome_merge_reference,
                                         topk_gather, topk_gather_reference, topk_split)

SLOW = settings(max_examples=12, deadline=None)


@SLOW
@given(batch=st.integers(1, 3), tokens=st.integers(4, 61), channels=st.integers(1, 40),
       protected=st.integers(0, 2), r_share=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_tome_merge_kernel_matches_reference(batch, tokens, channels, protected, r_share, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = max(tokens, protected + 2)
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.rand(batch, tokens, 1, generator=generator) * 3 + 1
    metric = torch.randn(batch, tokens, 8, generator=generator)
    x, size, metric = x.to(DEVICE), size.to(DEVICE), metric.to(DEVICE)
    r = int(r_share * ((tokens - protected) // 2))
    src, dst, unm = bipartite_soft_matching(metric, r, protected)
    got_x, got_size = tome_merge_kernel(x, size, src, dst, unm, protected)
    want_x, want_size = tome_merge_reference(x, size, src, dst, unm, protected)
    torch.testing.assert_close(got_size, want_size)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


@SLOW
@given(batch=st.integers(1, 3), tokens=st.integers(1, 300), channels=st.integers(1, 24),
       keep=st.floats(0.01, 1.0), ties=st.booleans(), block_n=st.sampled_from([16, 64, 1024]),
       seed=st.integers(0, 10_000))
def test_topk_gather_matches_reference(batch, tokens, channels, keep, ties, block_n, seed):
    """block_n: the tile the selection walks the row in (16 and 64: ties and kept tokens across tiles)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    scores = torch.randn(batch, tokens, generator=generator)
    x, scores = x.to(DEVICE), scores.to(DEVICE)
    if ties:
        scores = scores.round()       # many equal scores: the lower index must win, as in ONNX TopK
    k = max(1, int(keep * tokens))
    kept, gathered = topk_gather(x, scores, k, block_n=block_n)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
    assert torch.equal(kept, order)
    want_kept, want = topk_gather_reference(x, scores, k)      # ties too: the reference is top_k_in_order
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(gathered, want, rtol=0, atol=0)
    torch.testing.assert_close(gathered, x.gather(1, order.unsqueeze(-1).expand(-1, -1, channels)), rtol=0, atol=0)


@SLOW
@given(batch=st.integers(1, 3), tokens=st.integers(1, 200), keep=st.floats(0.01, 1.0), ties=st.booleans(),
       block_n=st.sampled_from([16, 64, 1024]), seed=st.integers(0, 10_000))
def test_topk_split_writes_the_best_and_the_rest_in_token_order(batch, tokens, keep, ties, block_n, seed):
    """ToMe's choice of edges: the k best (ties to the lower index, as the stable sort) and every other index."""
    scores = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    scores = scores.round() if ties else scores
    k = max(1, int(keep * tokens))
    kept, rest = topk_split(scores, k, block_n=block_n)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    assert torch.equal(kept, order[:, :k].sort(-1).values) and torch.equal(rest, order[:, k:].sort(-1).values)


@pytest.mark.parametrize("batch, tokens, channels, k", [(1, 3900, 3, 3841),
                                                        (2, 8200, 65, 5000)])
def test_topk_beyond_tensorrt_limit(batch, tokens, channels, k):
    """k above TensorRT's TopK limit of 3840 (3841 of 3900, and 5000 of a 8200-token video)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, channels, generator=generator).to(DEVICE)
    scores = torch.randn(batch, tokens, generator=generator).to(DEVICE)
    kept, gathered = topk_gather(x, scores, k)
    want_kept, want = topk_gather_reference(x, scores, k)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(gathered, want, rtol=0, atol=0)


def test_topk_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k=0 is out of range"):
        topk_gather(torch.randn(1, 4, 2), torch.randn(1, 4), 0)


@SLOW
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), length=st.integers(1, 70), dim=st.integers(1, 33),
       keep=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_kv_compact_in_place_matches_reference(batch, heads, length, dim, keep, seed):
    generator = torch.Generator().manual_seed(seed)
    cache = torch.randn(batch, heads, length, dim, generator=generator).to(DEVICE)
    k = int(keep * length)
    kept = torch.rand(batch, heads, length, generator=generator).argsort(-1)[..., :k].sort(-1).values.to(DEVICE)
    want = kv_compact_reference(cache, kept)
    storage = cache.data_ptr()
    assert kv_compact(cache, kept) == k
    assert cache.data_ptr() == storage          # in place
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


def test_kv_compact_refuses_a_bad_index_shape():
    with pytest.raises(ValueError, match="kept has shape"):
        kv_compact(torch.randn(1, 2, 5, 4), torch.zeros(1, 3, 2, dtype=torch.long))


def test_kv_compact_moves_every_kept_row_forward_by_one():
    """kept = [1, 2, ..., S-1]: each row is read by one element and written by the next, the case a tile's
    loads and stores could race on (in different warps of a GPU program)."""
    cache = torch.randn(2, 3, 300, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kept = torch.arange(1, 300, device=DEVICE).expand(2, 3, -1)
    want = kv_compact_reference(cache, kept)
    kv_compact(cache, kept)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_kernels_keep_half_precision(dtype, tolerance):
    """ViT-B-like sizes (197 tokens, 768 channels) in float16 and bfloat16, as a GPU serves them: within the
    dtype's rounding of the float32 merge, and the gather exact."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 197, 768, generator=generator).to(DEVICE, dtype)
    size = torch.ones(3, 197, 1).to(DEVICE, dtype)
    src, dst, unm = bipartite_soft_matching(torch.randn(3, 197, 64, generator=generator).to(DEVICE), 13, 1)
    got_x, got_size = tome_merge_kernel(x, size, src, dst, unm, 1)
    want_x, want_size = tome_merge_reference(x.float(), size.float(), src, dst, unm, 1)
    assert got_x.dtype == dtype and got_size.dtype == dtype
    torch.testing.assert_close(got_size.float(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got_x.float(), want_x, rtol=tolerance, atol=tolerance)
    scores = torch.randn(3, 196, generator=generator).to(DEVICE, dtype)
    kept, gathered = topk_gather(x[:, 1:], scores, 137)
    # ties in half precision: the kernel keeps the lower index, as ONNX TopK; compare sets via the gather
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :137].sort(-1).values
    assert torch.equal(kept, order)
    torch.testing.assert_close(gathered, x[:, 1:].gather(1, order.unsqueeze(-1).expand(-1, -1, 768)), rtol=0, atol=0)


def test_tome_matching_with_the_split_kernel_merges_the_same_tokens():
    """bipartite_soft_matching with split=topk_split (what plugins="kernel" exports) picks the same edges as
    its stable sort, duplicated tokens (equal similarities) included; src comes in token order instead."""
    generator = torch.Generator().manual_seed(6)
    metric = torch.randn(3, 41, 8, generator=generator)
    metric[:, 10:20] = metric[:, 20:30]  # duplicated tokens: ties among the best edges
    x, size = torch.randn(3, 41, 16, generator=generator), torch.rand(3, 41, 1, generator=generator) + 1
    metric, x, size = metric.to(DEVICE), x.to(DEVICE), size.to(DEVICE)
    for r in (1, 7, 20):
        want = bipartite_soft_matching(metric, r, 1)
        got = bipartite_soft_matching(metric, r, 1, split=topk_split)
        order = want[0].squeeze(-1).argsort(-1)
        assert torch.equal(got[0].squeeze(-1), want[0].squeeze(-1).gather(1, order))
        assert torch.equal(got[1].squeeze(-1), want[1].squeeze(-1).gather(1, order))
        assert torch.equal(got[2], want[2])
        for a, b in zip(tome_merge_reference(x, size, *got, 1), tome_merge_reference(x, size, *want, 1)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
