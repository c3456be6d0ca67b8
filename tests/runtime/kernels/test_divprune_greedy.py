"""DivPrune's one-launch greedy kernel against divprune_select (the source of truth): the same picks on
random features (N not a power of two, k = 1, k = N, batch > 1), ties (duplicated and orthogonal tokens:
the lower index wins, as torch.argmax), NaN, and the CUDA implementation of keep_diverse_vision_tokens. On CPU
tensors under TRITON_INTERPRET=1, on a GPU with TRITON_INTERPRET=0 (tests/devices.py)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.devices import KERNEL_DEVICE as DEVICE
from tokensparse.policies.divprune import cosine_distances, divprune_keep, divprune_select
from tokensparse.runtime.kernels import divprune_greedy, divprune_select_triton

SLOW = settings(max_examples=12, deadline=None)


def _features(batch, tokens, channels, seed, duplicates=False):
    generator = torch.Generator().manual_seed(seed)
    if duplicates:      # every token repeated: exact ties in every step once each distinct token is chosen
        distinct = torch.randn(batch, max(1, tokens // 3), channels, generator=generator)
        features = distinct.repeat(1, 3, 1)[:, torch.randperm(3 * distinct.shape[1], generator=generator)]
        return features[:, :tokens].contiguous()
    return torch.randn(batch, tokens, channels, generator=generator)


def _assert_same_picks(features, k):
    want = divprune_select(features, k)
    got = divprune_select_triton(features.to(DEVICE), k)
    assert got.dtype == want.dtype == torch.int64 and torch.equal(got.cpu(), want)


@SLOW
@given(batch=st.integers(1, 3), tokens=st.integers(1, 90), channels=st.integers(1, 16), keep=st.floats(0, 1),
       duplicates=st.booleans(), seed=st.integers(0, 10_000))
def test_kernel_picks_what_divprune_select_picks(batch, tokens, channels, keep, duplicates, seed):
    features = _features(batch, tokens, channels, seed, duplicates)
    tokens = features.shape[1]
    _assert_same_picks(features, max(1, round(keep * tokens)))


@pytest.mark.parametrize("batch, tokens, channels, k", [(1, 1, 4, 1), (2, 37, 8, 1), (3, 50, 5, 50),
                                                        (2, 129, 16, 13), (1, 576, 32, 58)])
def test_shapes(batch, tokens, channels, k):
    """N not a power of two (37, 50, 129: one lane past 128), k = 1, k = N, LLaVA's 576 image tokens at ~10%."""
    _assert_same_picks(_features(batch, tokens, channels, seed=tokens), k)


def test_pick_order_is_the_greedy_order():
    """The kernel's picks for k = N, in pick order: each prefix is divprune_select's choice for that k."""
    features = _features(2, 23, 6, seed=3)
    distances = cosine_distances(features.float())
    nearest = distances.masked_fill(torch.eye(23, dtype=torch.bool), torch.inf).min(dim=-1).values
    picks = divprune_greedy(distances.to(DEVICE), nearest.to(DEVICE), 23).cpu()
    assert torch.equal(picks.sort(dim=1).values, torch.arange(23).expand(2, -1))
    for k in range(1, 24):
        assert torch.equal(picks[:, :k].sort(dim=1).values, divprune_select(features, k))


@pytest.mark.parametrize("k", [1, 4, 9, 12])
def test_ties_go_to_the_lower_index(k):
    """Orthogonal tokens are all at distance exactly 1, duplicated ones at 0: every step is a tie."""
    orthogonal = torch.eye(12)[None].repeat(2, 1, 1)
    _assert_same_picks(orthogonal, k)
    assert torch.equal(divprune_select_triton(orthogonal.to(DEVICE), k).cpu(), torch.arange(k).expand(2, -1))
    duplicated = torch.cat([orthogonal[:, :4], orthogonal[:, :4], orthogonal[:, :4]], dim=1)
    _assert_same_picks(duplicated, k)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_nan_as_torch_argmax(k):
    """A NaN or inf feature makes NaN distances; torch.argmax takes the first NaN, and so does the kernel."""
    features = _features(2, 20, 4, seed=7)
    features[0, 5] = float("nan")
    features[1, 3, 1] = float("inf")
    _assert_same_picks(features, k)


def test_k_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        divprune_select_triton(torch.randn(1, 4, 3).to(DEVICE), 0)
    with pytest.raises(ValueError, match="out of range"):
        divprune_select_triton(torch.randn(1, 4, 3).to(DEVICE), 5)


def test_keep_diverse_triton_matches_the_op():
    """The CUDA implementation registered under TOKENSPARSE_TRITON_KERNELS=1 (runtime/triton_ops.py)."""
    import tokensparse.runtime.triton_ops as triton_ops
    from tokensparse.runtime.ops import KEEP_DIVERSE

    assert torch._C._dispatch_has_kernel_for_dispatch_key("tokensparse::keep_diverse_vision_tokens", "CUDA")
    features = _features(2, 40, 8, seed=11)
    image_mask = torch.zeros(2, 40, dtype=torch.bool)
    image_mask[0, 3:30] = True
    image_mask[1, 10:37] = True
    got = triton_ops.keep_diverse_triton(features.to(DEVICE), image_mask.to(DEVICE), 0.3)
    want = KEEP_DIVERSE(features, image_mask, 0.3)        # CPU: the plain PyTorch implementation
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want, divprune_keep(features, image_mask, 0.3))
