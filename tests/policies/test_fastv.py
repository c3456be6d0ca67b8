"""FastV's scores from the needed query rows equal full attention weights averaged as the method says;
kept positions are every text token plus the top image tokens, in order."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torch._subclasses.fake_tensor import FakeTensorMode

from tokensparse.policies.fastv import (KEEP_VISION, fastv_keep, fastv_keep_step, fastv_scores, kept_image_count,
                                       kept_image_counts)


def _full_attention(q, k, scale):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    sequence = q.shape[2]
    causal = torch.ones(sequence, sequence, dtype=torch.bool).tril()
    return (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, -math.inf).softmax(-1)   # [B, H, S, S]


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.sampled_from([1, 2]), group=st.integers(1, 3), before=st.integers(1, 4),
       images=st.integers(1, 12), after=st.integers(1, 5), seed=st.integers(0, 999))
def test_scores_equal_full_attention_rows(batch, kv_heads, group, before, images, after, seed):
    generator = torch.Generator().manual_seed(seed)
    sequence = before + images + after
    q = torch.randn(batch, kv_heads * group, sequence, 8, generator=generator)
    k = torch.randn(batch, kv_heads, sequence, 8, generator=generator)
    image_mask = torch.zeros(batch, sequence, dtype=torch.bool)
    image_mask[:, before:before + images] = True
    weights = _full_attention(q, k, 0.3)
    torch.testing.assert_close(fastv_scores(q, k, 0.3, image_mask, "last"), weights[:, :, -1].mean(1))
    text_rows = weights.mean(1)[:, ~image_mask[0]]
    torch.testing.assert_close(fastv_scores(q, k, 0.3, image_mask, "text"), text_rows.mean(1))


@settings(max_examples=20, deadline=None)
@given(pads=st.lists(st.integers(0, 3), min_size=1, max_size=3), images=st.integers(1, 8), additive=st.booleans(),
       seed=st.integers(0, 999))
def test_left_padding_is_masked_and_padding_rows_do_not_vote(pads, images, additive, seed):
    """With a padding mask (bool, or additive with the dtype's minimum as HF builds it), each sample's scores
    equal those of the same sample without its padding: padding keys get nothing, padding rows do not vote."""
    generator = torch.Generator().manual_seed(seed)
    batch, before, after, most = len(pads), 2, 3, max(pads)
    sequence = most + before + images + after
    q = torch.randn(batch, 4, sequence, 8, generator=generator)
    k = torch.randn(batch, 2, sequence, 8, generator=generator)
    real = torch.arange(sequence)[None, :] >= (most - torch.tensor(pads))[:, None]          # [B, S]
    allowed = torch.ones(sequence, sequence, dtype=torch.bool).tril() & real[:, None, :] & real[:, :, None]
    mask = allowed[:, None]
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    image_mask = torch.zeros(batch, sequence, dtype=torch.bool)
    image_mask[:, most + before:most + before + images] = True
    for query in ("last", "text"):
        padded = fastv_scores(q, k, 0.3, image_mask, query, mask)
        for b, pad in enumerate(pads):
            start = most - pad
            alone = fastv_scores(q[b:b + 1, :, start:], k[b:b + 1, :, start:], 0.3, image_mask[b:b + 1, start:], query)
            torch.testing.assert_close(padded[b, start:], alone[0])
            assert bool((padded[b, :start] == 0).all())


def test_keep_text_and_top_images_in_order():
    image_mask = torch.tensor([[False, True, True, True, True, False], [False, False, True, True, True, True]])
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.4, 0.2, 9.0], [9.0, 9.0, 0.3, 0.2, 0.9, 0.1]])
    kept = fastv_keep(scores, image_mask, keep=0.5)
    assert kept.tolist() == [[0, 2, 3, 5], [0, 1, 2, 4]]
    assert kept_image_count(576, 0.25) == 144


@given(image_tokens=st.integers(0, 5000), keep=st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1 / 3, 1.0]),
                                                         st.floats(0.0, 1.0)))
def test_kept_image_count_in_python_equals_its_tensor_form(image_tokens, keep):
    """Compiled code calls the Python form while tracing; the eager op and exported graphs use the tensor form."""
    tensor = kept_image_counts(torch.tensor([image_tokens]), keep)[0].clamp_max(image_tokens)
    assert kept_image_count(image_tokens, keep) == int(tensor)


def test_keep_vision_with_the_image_count_given():
    """With each sample's image-token count given (the forward checked it), the kept positions are the same, the
    fake output's length is known (no data-dependent size), and a wrong count is refused eagerly."""
    image_mask = torch.tensor([[False, True, True, True, True, False], [False, False, True, True, True, True]])
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.4, 0.2, 9.0], [9.0, 9.0, 0.3, 0.2, 0.9, 0.1]])
    want = fastv_keep(scores, image_mask, 0.5)
    assert KEEP_VISION(scores, image_mask, 0.5, 4).tolist() == want.tolist()
    with FakeTensorMode() as mode:
        fake = KEEP_VISION(mode.from_tensor(scores), mode.from_tensor(image_mask), 0.5, 4)
    assert fake.shape == (2, 4)
    traced = torch.fx.experimental.proxy_tensor.make_fx(
        lambda s, m: fastv_keep_step(s, m, 0.5, 4), tracing_mode="fake")(scores, image_mask)
    assert not [node for node in traced.graph.nodes if "_local_scalar_dense" in str(node.target)]
    assert traced(scores, image_mask).tolist() == want.tolist()
    with pytest.raises(ValueError, match="4 image tokens each where the compiled graph expects 3"):
        KEEP_VISION(scores, image_mask, 0.5, 3)


def test_unequal_image_counts_are_refused():
    image_mask = torch.tensor([[False, True, True], [False, True, False]])
    with pytest.raises(ValueError, match="different numbers of image tokens"):
        fastv_keep(torch.rand(2, 3), image_mask, 0.5)


def test_unknown_query_is_refused():
    with pytest.raises(ValueError, match="query='first' is not one of"):
        fastv_scores(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), 1.0, torch.zeros(1, 3, dtype=torch.bool), "first")
