"""Triton kernels against their PyTorch references under TRITON_INTERPRET=1: random shapes, batch > 1,
odd sizes, token counts above TensorRT's TopK limit of 3840."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tokensparse.policies.tome import bipartite_soft_matching
from tokensparse.runtime.kernels import (kv_compact, kv_compact_reference, tome_merge_kernel, tome_merge_reference,
                                         topk_gather, topk_gather_reference)

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
    r = int(r_share * ((tokens - protected) // 2))
    src, dst, unm = bipartite_soft_matching(metric, r, protected)
    got_x, got_size = tome_merge_kernel(x, size, src, dst, unm, protected)
    want_x, want_size = tome_merge_reference(x, size, src, dst, unm, protected)
    torch.testing.assert_close(got_size, want_size)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


@SLOW
@given(batch=st.integers(1, 3), tokens=st.integers(1, 300), channels=st.integers(1, 24),
       keep=st.floats(0.01, 1.0), ties=st.booleans(), seed=st.integers(0, 10_000))
def test_topk_gather_matches_reference(batch, tokens, channels, keep, ties, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    scores = torch.randn(batch, tokens, generator=generator)
    if ties:
        scores = scores.round()       # many equal scores: the lower index must win, as in ONNX TopK
    k = max(1, int(keep * tokens))
    kept, gathered = topk_gather(x, scores, k)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
    assert torch.equal(kept, order)
    if not ties:
        want_kept, want = topk_gather_reference(x, scores, k)
        assert torch.equal(kept, want_kept)
        torch.testing.assert_close(gathered, want, rtol=0, atol=0)
    torch.testing.assert_close(gathered, x.gather(1, order.unsqueeze(-1).expand(-1, -1, channels)), rtol=0, atol=0)


def test_topk_beyond_tensorrt_limit():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3900, 3, generator=generator)
    scores = torch.randn(1, 3900, generator=generator)
    kept, gathered = topk_gather(x, scores, 3841)      # one more than TensorRT's TopK allows
    want_kept, want = topk_gather_reference(x, scores, 3841)
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
    cache = torch.randn(batch, heads, length, dim, generator=generator)
    k = int(keep * length)
    kept = torch.rand(batch, heads, length, generator=generator).argsort(-1)[..., :k].sort(-1).values
    want = kv_compact_reference(cache, kept)
    storage = cache.data_ptr()
    assert kv_compact(cache, kept) == k
    assert cache.data_ptr() == storage          # in place
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


def test_kv_compact_refuses_a_bad_index_shape():
    with pytest.raises(ValueError, match="kept has shape"):
        kv_compact(torch.randn(1, 2, 5, 4), torch.zeros(1, 3, 2, dtype=torch.long))
