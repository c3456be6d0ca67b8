"""Regions that call tokensparse's own functions (inlined policy steps, the size bias) stay cacheable by
AOTAutograd: marked with a key from tokensparse's source, and with their values where its check looks."""

import pytest
from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_cacheable

import tokensparse.regions as regions
from tests.models import build
from tokensparse import Config, ToMe
from tokensparse.capture import capture_graphs
from tokensparse.fx.rewrite import rewrite_graph
from tokensparse.inductor_cache import cacheable, source_hash, tokensparse_functions
from tokensparse.inline_steps import inline_policy_steps


@pytest.fixture(scope="module")
def block_region():
    model, pixels = build("timm_vit", depth=4, width=32, heads=2, batch=2)
    [(gm, inputs)] = capture_graphs(model, pixels)
    result = rewrite_graph(gm, inputs, Config(vision=ToMe(r=2)))
    plan = regions.plan_regions(result.gm, result.match.blocks)
    inline_policy_steps(plan.split)
    return getattr(plan.split, plan.groups[2][0])           # a block after the first merge


def test_a_merging_block_calls_tokensparse_functions(block_region):
    names = tokensparse_functions(block_region)
    assert "tokensparse.policies.tome.tome_merge_step" in names
    assert all(name.startswith("tokensparse.") for name in names)


def test_marked_functions_make_the_region_cacheable(block_region):
    with pytest.raises(BypassAOTAutogradCache, match="tokensparse"):
        check_cacheable(block_region)
    with cacheable(block_region):
        check_cacheable(block_region)
        import torch._inductor.config as inductor_config

        assert set(inductor_config.unsafe_marked_cacheable_functions.values()) == {source_hash()}
    import torch._inductor.config as inductor_config

    assert not inductor_config.unsafe_marked_cacheable_functions
