"""What the language-model policies share: their stages name a known scoring rule."""

import pytest

from tokensparse.policies.language import SCORES, Stage


def test_stage_rejects_an_unknown_score():
    with pytest.raises(ValueError, match=r"score='attention' is unknown: choose one of \['previous_attention'"):
        Stage(3, 0.5, "attention")
    assert [Stage(1, 0.5, score).score for score in SCORES] == list(SCORES)
