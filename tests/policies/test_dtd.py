"""DTD's steps: the previous frame's patch from M-RoPE ids equals a brute-force search, the kept set is
exactly the changed patches (and, in a batch, the most-keeping sample's count), and bad options are refused."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensparse
from tokensparse.policies.dtd import dtd_keep, previous_frame_positions, temporal_similarity


def _video_positions(start: int, frames: int, height: int, width: int) -> torch.Tensor:
    """[3, N] M-RoPE ids of one video laid out frame by frame, as Qwen2-VL's get_rope_index makes them."""
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t + start, h + start, w + start]).reshape(3, -1)


def _prompt(pieces) -> tuple[torch.Tensor, torch.Tensor]:
    """([3, 1, S] ids, [1, S] vision mask) of a prompt of ("text", n) and ("video", frames, h, w) pieces."""
    ids, vision, position = [], [], 0
    for kind, *shape in pieces:
        if kind == "text":
            ids.append(torch.arange(position, position + shape[0]).expand(3, -1))
            vision.append(torch.zeros(shape[0], dtype=torch.bool))
            position += shape[0]
        else:
            ids.append(_video_positions(position, *shape))
            vision.append(torch.ones(math.prod(shape), dtype=torch.bool))
            position += max(shape[1:])
    return torch.cat(ids, dim=1)[:, None], torch.cat(vision)[None]


def _brute_force_previous(positions: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """For each vision token, the vision token with the same height and width ids and the largest smaller
    temporal id, by comparing every pair."""
    t, h, w = positions[:, 0]
    previous = torch.full(vision.shape, -1)
    for i in vision[0].nonzero()[:, 0].tolist():
        candidates = [j for j in vision[0].nonzero()[:, 0].tolist()
                      if h[j] == h[i] and w[j] == w[i] and t[j] < t[i]]
        if candidates:
            previous[0, i] = max(candidates, key=lambda j: t[j])
    return previous


def test_previous_frame_of_two_videos_and_an_image():
    # an image is a one-frame video: it has no previous frame, so DTD keeps it
    positions, vision = _prompt([("text", 3), ("video", 1, 2, 2), ("text", 2), ("video", 3, 2, 3), ("text", 4)])
    previous = previous_frame_positions(positions, vision)
    first = 3 + 4 + 2                                  # where the three-frame video starts
    want = torch.full(vision.shape, -1)
    want[0, first + 6:first + 18] = torch.arange(first, first + 12)
    assert torch.equal(previous, want)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), min_size=1,
                max_size=3))
def test_previous_frame_equals_a_brute_force_search(videos):
    pieces = [piece for text, *shape in videos for piece in (("text", text + 1), ("video", *shape))]
    positions, vision = _prompt(pieces)
    assert torch.equal(previous_frame_positions(positions, vision), _brute_force_previous(positions, vision))


def test_repeated_frames_are_dropped_and_changed_ones_kept():
    positions, vision = _prompt([("text", 2), ("video", 3, 2, 2), ("text", 2)])
    features = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    features[0, 6:10] = 3 * features[0, 2:6]          # frame 1 repeats frame 0 (up to scale)
    features[0, 11] = features[0, 7] + 1e-3          # one patch of frame 2 barely changes
    kept = dtd_keep(features, vision, positions, tau=0.99)
    want = [0, 1, 2, 3, 4, 5, 10, 12, 13, 14, 15]
    assert kept.tolist() == [want]
    similarity = temporal_similarity(features, vision, positions)
    assert similarity[0, :6].eq(-math.inf).all() and similarity[0, 6:10].gt(0.999).all()


def test_a_batch_keeps_the_most_keeping_samples_count():
    positions, vision = _prompt([("text", 1), ("video", 2, 1, 4), ("text", 1)])
    positions, vision = positions.expand(3, 2, -1), vision.expand(2, -1)
    features = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    features[:, 5:9] = features[:, 1:5]                     # both samples: frame 1 repeats frame 0 ...
    features[1, 7] = -features[1, 3]                        # ... but for one patch of sample 1
    features[0, 6] += 0.2 * torch.randn(8, generator=torch.Generator().manual_seed(2))   # still similar
    similarity = temporal_similarity(features, vision, positions)
    assert 0.9 < similarity[0, 6] < similarity[0, [5, 7, 8]].min()
    kept = dtd_keep(features, vision, positions, tau=0.9)
    assert kept[1].tolist() == [0, 1, 2, 3, 4, 7, 9]           # its own changed patch
    # sample 0 drops all four but keeps as many as sample 1: its least similar one
    assert kept[0].tolist() == [0, 1, 2, 3, 4, 6, 9]


def test_options_are_checked():
    with pytest.raises(ValueError, match="tau=1.5 is out of range"):
        tokensparse.DTD(tau=1.5)
    with pytest.raises(ValueError, match="must be a cosine similarity"):
        tokensparse.DTD(tau="high")
    assert tokensparse.DTD(tau=1.0).is_identity(4) and not tokensparse.DTD(tau=0.9).is_identity(4)
    config = tokensparse.config_from_options({"policy": "dtd", "tau": 0.8})
    assert config.llm == tokensparse.DTD(tau=0.8)
