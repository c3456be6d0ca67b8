"""DivPrune's O(kN) greedy equals the textbook O(k^2 N) loop; VisionZip's dominant and contextual tokens
equal a per-sample loop written from the paper's description."""

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from torch._subclasses.fake_tensor import FakeTensorMode

from tokensparse.policies.divprune import KEEP_DIVERSE, cosine_distances, divprune_select
from tokensparse.policies.visionzip import visionzip_select


def _divprune_loop(distances, k):
    """The textbook greedy on one sample's cosine distance matrix [N, N]."""
    tokens = distances.shape[0]
    off_diagonal = distances + torch.diag(torch.full((tokens,), float("inf")))
    chosen = [int(off_diagonal.min(dim=1).values.argmax())]
    while len(chosen) < k:
        best, best_value = None, -float("inf")
        for i in range(tokens):
            if i in chosen:
                continue
            value = min(float(distances[i, j]) for j in chosen)
            if value > best_value:
                best, best_value = i, value
        chosen.append(best)
    return sorted(chosen)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 30), share=st.floats(0.01, 1.0), seed=st.integers(0, 999))
@example(batch=2, tokens=4, share=0.5, seed=544)
def test_divprune_matches_the_textbook_loop(batch, tokens, share, seed):
    features = torch.randn(batch, tokens, 6, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(share * tokens))
    got = divprune_select(features, k)
    # The same distances for both: a batched and a single-sample matmul may round differently, and two
    # mutual nearest neighbours tie exactly in exact arithmetic (seed 544 flipped the first pick that way).
    distances = cosine_distances(features.float())
    for b in range(batch):
        assert got[b].tolist() == _divprune_loop(distances[b], k)


def test_divprune_rejects_bad_k():
    with pytest.raises(ValueError, match="k=0 is out of range"):
        divprune_select(torch.randn(1, 4, 3), 0)


def _visionzip_loop(hidden, scores, keys, dominant, contextual, protected):
    """One sample, from METHODS.md: (the hidden rows with contextual tokens at their targets, kept rows)."""
    rest, metric = hidden[protected:].clone(), torch.nn.functional.normalize(keys[protected:], dim=-1)
    kept = sorted(scores.topk(dominant).indices.tolist())
    remaining = [i for i in range(rest.shape[0]) if i not in kept]
    targets = []
    if contextual:
        stride = len(remaining) // contextual
        targets = [remaining[t * stride] for t in range(contextual)]
        others = [i for i in remaining if i not in targets]
        joined = {t: [] for t in targets}
        for i in others:
            similarity = torch.stack([metric[i] @ metric[t] for t in targets])
            joined[targets[int(similarity.argmax())]].append(i)
        for t in targets:
            rest[t] = rest[t] + (rest[joined[t]].mean(0) if joined[t] else 0)
    rows = list(range(protected)) + sorted(protected + i for i in kept + targets)
    return torch.cat([hidden[:protected], rest]), rows


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), protected=st.integers(0, 1), patches=st.integers(6, 40), contextual=st.integers(0, 6),
       seed=st.integers(0, 999))
def test_visionzip_matches_a_per_sample_loop(batch, protected, patches, contextual, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = protected + patches
    hidden, keys = torch.randn(batch, tokens, 5, generator=generator), torch.randn(batch, tokens, 4, generator=generator)
    scores = torch.rand(batch, patches, generator=generator)
    dominant, contextual = patches // 3, min(contextual, patches - patches // 3)
    zipped, rows = visionzip_select(hidden, scores, keys, dominant, contextual, protected)
    assert rows.shape == (batch, protected + dominant + contextual)
    for b in range(batch):
        want_hidden, want_rows = _visionzip_loop(hidden[b], scores[b], keys[b], dominant, contextual, protected)
        assert rows[b].tolist() == want_rows
        torch.testing.assert_close(zipped[b], want_hidden)


def test_visionzip_rejects_counts_that_do_not_fit():
    with pytest.raises(ValueError, match="dominant=5, contextual=4 do not fit 8 patch tokens"):
        visionzip_select(torch.randn(1, 9, 3), torch.rand(1, 8), torch.randn(1, 9, 2), 5, 4, 1)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), before=st.integers(0, 4), images=st.integers(1, 10), after=st.integers(1, 4),
       keep=st.floats(0.05, 1.0), seed=st.integers(0, 999))
def test_divprune_keep_keeps_text_and_the_diverse_images_in_order(batch, before, images, after, keep, seed):
    from tokensparse.policies.divprune import divprune_keep
    from tokensparse.policies.fastv import kept_image_count

    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, before + images + after, 6, generator=generator)
    image_mask = torch.zeros(batch, before + images + after, dtype=torch.bool)
    image_mask[:, before:before + images] = True
    kept = divprune_keep(features, image_mask, keep)
    count = kept_image_count(images, keep)
    chosen = divprune_select(features[:, before:before + images], count) + before
    for row in range(batch):
        want = list(range(before)) + chosen[row].tolist() + list(range(before + images, before + images + after))
        assert kept[row].tolist() == want
    # the image-token count given (the forward checked it): the same positions, and the op's fake has their length
    assert divprune_keep(features, image_mask, keep, image_tokens=images).tolist() == kept.tolist()
    with FakeTensorMode() as mode:
        fake = KEEP_DIVERSE(mode.from_tensor(features), mode.from_tensor(image_mask), keep, images)
    assert fake.shape == kept.shape


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(3, 24), images=st.integers(1, 12), keep=st.floats(0.05, 1.0),
       seed=st.integers(0, 999))
@example(batch=2, length=11, images=7, keep=0.5, seed=299)     # mutual nearest neighbours: the first pick ties
def test_the_exported_divprune_selection_equals_the_eager_one(batch, length, images, keep, seed):
    """divprune_keep_in_sequence (a while_loop over the whole sequence, for ONNX) keeps what divprune_keep does,
    with the image tokens anywhere in each sample."""
    from tokensparse.policies.divprune import divprune_keep, divprune_keep_in_sequence

    generator = torch.Generator().manual_seed(seed)
    images = min(images, length)
    features = torch.randn(batch, length, 6, generator=generator)
    order = torch.rand(batch, length, generator=generator).argsort(dim=1)
    image_mask = torch.zeros(batch, length, dtype=torch.bool).scatter(1, order[:, :images], True)
    assert torch.equal(divprune_keep_in_sequence(features, image_mask, keep), divprune_keep(features, image_mask, keep))
