"""Options -> Config: every bad option is a ValueError that names it."""

import pytest

from tokensparse import Config, DivPrune, FastV, PyramidDrop, ToMe, TopK, VisionZip, VisualExit
from tokensparse.config import config_from_options


def test_options_build_typed_policies():
    assert config_from_options({"policy": "tome", "r": 8}).policy == ToMe(r=8)
    config = config_from_options({"policy": "topk", "layers": [6, 3], "keep": 0.5, "inductor": False})
    assert config.policy == TopK(layers=(3, 6), keep=0.5) and config.inductor is False
    assert config_from_options(Config(vision=ToMe(r=2))).policy == ToMe(r=2)


@pytest.mark.parametrize("options, message", [
    ({"policy": "fastest"}, r"policy='fastest' is unknown: choose one of \['adaptive', 'divprune', 'dtd', 'exit', 'fastv', 'h2o', "
                            r"'key_norm', 'pyramiddrop', 'snapkv', 'streamingllm', 'tome', 'topk', 'vision_budget', "
                            r"'visionzip'\]"),
    ({"policy": "visionzip", "dominant": -1}, "dominant=-1 is out of range"),
    ({"policy": "visionzip", "dominant": 0, "contextual": 0}, "keeps no image token"),
    ({"policy": "visionzip", "contextual": 2.5}, "contextual=2.5 must be an integer"),
    ({"policy": "fastv", "keep": 0.0}, "keep=0.0 is out of range"),
    ({"policy": "fastv", "layer": 0}, "layer=0 is out of range"),
    ({"policy": "fastv", "query": "first"}, "query='first' is unknown"),
    ({"policy": "fastv", "vision_span": (5, 2)}, r"vision_span=\(5, 2\) must be \(start, end\)"),
    ({"policy": "pyramiddrop", "layers": [2, 2]}, r"layers=\[2, 2\] repeats a layer"),
    ({"policy": "pyramiddrop", "ratio": 1.5}, "ratio=1.5 is out of range"),
    ({"policy": "divprune", "keep": -0.1}, "keep=-0.1 is out of range"),
    ({"policy": "exit", "layer": "3"}, "layer='3' must be an integer"),
    ({"r": 3}, "options has no 'policy'"),
    ({"policy": "tome", "keep": 0.5}, "option 'keep' is unknown for policy 'tome'"),
    ({"policy": "tome", "r": -1}, "r=-1 is out of range"),
    ({"policy": "topk", "keep": 2}, "keep=2 is out of range"),
    ({"policy": "tome", "cudagraphs": 1}, "cudagraphs=1 must be True or False"),
    ({"policy": "tome", "cudagraphs": True, "inductor": False}, "cudagraphs=True needs inductor=True"),
    ({"policy": "fastv", "cudagraphs": True}, r"cudagraphs=True is for vision-encoder policies \(vision=\) only"),
    ({"policy": "snapkv", "budget": 64, "cudagraphs": True}, "cudagraphs=True is for vision-encoder policies"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        config_from_options(options)


def test_language_policies_go_to_the_llm_slot():
    config = config_from_options({"policy": "fastv", "layer": 3, "keep": 0.25})
    assert config.llm == FastV(layer=3, keep=0.25) and config.vision is None and config.policy == config.llm
    assert config_from_options({"policy": "pyramiddrop", "layers": [16, 8]}).llm == PyramidDrop(layers=(8, 16))
    assert [stage.keep for stage in VisualExit(layer=4).stages()] == [0.0]
    assert DivPrune().stages()[0].layer == 0


def test_kv_policies_go_to_the_kv_slot():
    from tokensparse import H2O, AdaptiveKV, SnapKV, StreamingLLM, VisionBudget

    config = config_from_options({"policy": "snapkv", "budget": 16, "window": 4})
    assert config.kv == SnapKV(budget=16, window=4) and config.policy is None
    assert config_from_options({"policy": "streamingllm", "sinks": 2}).kv == StreamingLLM(sinks=2)
    assert config_from_options({"policy": "h2o", "heavy": 16, "recent": 8}).kv == H2O(heavy=16, recent=8)
    assert config_from_options({"policy": "adaptive", "tau": 0.8}).kv == AdaptiveKV(tau=0.8)
    assert config_from_options({"policy": "vision_budget", "vision": 64, "alpha": 0.1, "temporal_rank": 32}).kv \
        == VisionBudget(vision=64, alpha=0.1, temporal_rank=32)
    assert Config(llm=FastV(), kv=SnapKV()).kv == SnapKV()
    with pytest.raises(ValueError, match="kv=FastV.* must be a KV-cache policy"):
        Config(kv=FastV())
    both = Config(vision=ToMe(r=2), llm=FastV(), kv=SnapKV())     # a VLM: the tower, then the language model
    with pytest.raises(ValueError, match="vision=tome and llm=visionzip together are not supported"):
        Config(vision=ToMe(r=2), llm=VisionZip())
    assert both.policy == ToMe(r=2) and both.llm == FastV() and both.kv == SnapKV()
    with pytest.raises(ValueError, match="vision=SnapKV.* must be a vision-encoder policy"):
        Config(vision=SnapKV())


def test_config_rejects_non_policy():
    with pytest.raises(ValueError, match="vision='tome' must be a vision-encoder policy"):
        Config(vision="tome")
    with pytest.raises(ValueError, match="vision=FastV.* must be a vision-encoder policy"):
        Config(vision=FastV())
    with pytest.raises(ValueError, match="llm=ToMe.* must be a language-model policy"):
        Config(llm=ToMe(r=2))


@pytest.mark.parametrize("facts, message", [
    ({"decode_masks_follow_cache": 1}, "decode_masks_follow_cache=1 must be True or False"),
    ({"kv_masks_follow_cache": "yes"}, "kv_masks_follow_cache='yes' must be True or False"),
    ({"sliding_windows": [4, 0]}, r"sliding_windows=\[4, 0\] must be a tuple of each decoder layer's window"),
    ({"sliding_windows": (4, -1)}, r"sliding_windows=\(4, -1\) must be a tuple"),
])
def test_caller_facts_are_checked(facts, message):
    """What tokensparse.compile() hands the backend beside the Config; the Config itself does not take them."""
    from tokensparse.config import CallerFacts

    with pytest.raises(ValueError, match=message):
        CallerFacts(**facts)
    assert CallerFacts(True, True, (4, 0)).sliding_windows == (4, 0)
    with pytest.raises(TypeError):
        Config(**facts)


def _bool_fields():
    import dataclasses

    from tokensparse.policies import POLICIES

    for name, cls in sorted(POLICIES.items()):
        for field in dataclasses.fields(cls):
            if field.type in (bool, "bool"):
                yield name, field.name


@pytest.mark.parametrize("policy, flag", list(_bool_fields()))
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_every_boolean_option_is_type_checked(policy, flag, value):
    """proportional_attention="no" must not turn proportional attention on."""
    options = {"policy": policy, flag: value}
    if policy == "topk":
        options["layers"] = (1,)
    with pytest.raises(ValueError, match=rf"{flag}={value!r} must be True or False"):
        config_from_options(options)


def test_boolean_fields_are_found():
    assert {("tome", "proportional_attention"), ("topk", "fuse")} <= set(_bool_fields())


@pytest.mark.parametrize("make, message", [
    (lambda: TopK(layers=1.0), r"layers=1.0 must be one block index \(an int\) or a list of them"),
    (lambda: TopK(layers="12"), r"layers='12' must be one block index \(an int\) or a list of them"),
    (lambda: config_from_options(ToMe(r=2)), r"got the policy ToMe\(r=2.*pass tokensparse.Config\(vision=ToMe"),
    (lambda: config_from_options(FastV(layer=2)), r"pass tokensparse.Config\(llm=FastV"),
    (lambda: config_from_options("tome"), r"got the string 'tome' where a Config or an options dict goes"),
])
def test_natural_mistakes_get_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_compile_with_a_policy_instead_of_a_config():
    import torch

    import tokensparse

    with pytest.raises(ValueError, match=r"pass tokensparse.Config\(vision=ToMe"):
        tokensparse.compile(torch.nn.Linear(2, 2), ToMe(r=2))
