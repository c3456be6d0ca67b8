"""Options -> Config: every bad option is a ValueError that names it."""

import pytest

from tokensparse import Config, ToMe, TopK
from tokensparse.config import config_from_options


def test_options_build_typed_policies():
    assert config_from_options({"policy": "tome", "r": 8}).policy == ToMe(r=8)
    config = config_from_options({"policy": "topk", "layers": [6, 3], "keep": 0.5, "inductor": False})
    assert config.policy == TopK(layers=(3, 6), keep=0.5) and config.inductor is False
    assert config_from_options(Config(vision=ToMe(r=2))).policy == ToMe(r=2)


@pytest.mark.parametrize("options, message", [
    ({"policy": "fastest"}, r"policy='fastest' is unknown: choose one of \['tome', 'topk'\]"),
    ({"r": 3}, "options has no 'policy'"),
    ({"policy": "tome", "keep": 0.5}, "option 'keep' is unknown for policy 'tome'"),
    ({"policy": "tome", "r": -1}, "r=-1 is out of range"),
    ({"policy": "topk", "keep": 2}, "keep=2 is out of range"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        config_from_options(options)


def test_config_rejects_non_policy():
    with pytest.raises(ValueError, match="vision='tome' must be a policy"):
        Config(vision="tome")
