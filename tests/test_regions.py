"""Regional compilation: the split graph equals the rewritten graph, blocks of one structure share one
compile, and the backend falls back to a whole-graph compile (with one warning) if splitting fails."""

import warnings

import pytest
import torch

import tokensparse.regions as regions
from tests.conftest import main_outputs
from tests.models import VISION_FAMILIES, build
from tokensparse import Config, ToMe, TokensparseWarning, TopK
from tokensparse.capture import capture_graphs
from tokensparse.config import NO_FACTS, CallerFacts
from tokensparse.reference import reference_forward
from tokensparse.fx.rewrite import rewrite_graph


def _rewritten(family, policy, depth=5, facts=NO_FACTS):
    model, pixels = build(family, depth=depth, width=32, heads=2, batch=2)
    [(gm, inputs)] = capture_graphs(model, pixels)
    result = rewrite_graph(gm, inputs, Config(vision=policy), facts=facts)
    assert result.changed, result.reason
    return result, inputs


def _eager(region, inputs):
    return region.forward


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_split_graph_equals_rewritten_graph(family):
    result, inputs = _rewritten(family, ToMe(r=2))
    with torch.no_grad():
        want = result.gm(*inputs)
        plan = regions.plan_regions(result.gm, result.match.blocks)
        got = regions.compile_regions(plan, _eager)(*inputs)
    assert plan.regions == 5 + 2  # before the blocks, five blocks, after them
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tome_blocks_after_the_first_share_one_compile():
    result, _ = _rewritten("timm_vit", ToMe(r=2), depth=5)
    plan = regions.plan_regions(result.gm, result.match.blocks)
    # Block 0 sees the static token count; the last block returns no sizes (nothing reads them), so it runs the
    # compile of blocks 1..3 and keeps its first output.
    assert plan.groups == [["submod_0"], ["submod_1"], ["submod_2", "submod_3", "submod_4"], ["submod_5"],
                           ["submod_6"]]
    assert plan.lenders == {3: (2, regions.OutputSelection((0,), single=True))}
    assert plan.compiles == 4


def test_a_region_returning_fewer_values_borrows_only_an_equal_graph():
    def traced(fn):
        gm = torch.fx.symbolic_trace(fn)
        gm.graph.find_nodes(op="placeholder")[0].meta["val"] = torch.empty(3, 4)
        return gm

    both = traced(lambda x: (x.relu() + 1, x.sum(-1)))
    assert regions.outputs_served_by(both, traced(lambda x: x.relu() + 1)) == regions.OutputSelection((0,), True)
    assert regions.outputs_served_by(both, traced(lambda x: (x.sum(-1),))) == regions.OutputSelection((1,), False)
    assert regions.outputs_served_by(both, traced(lambda x: x.relu() + 2)) is None
    assert regions.outputs_served_by(both, traced(lambda x: (x.relu() + 1, x.sum(-1)))) is None
    assert regions.OutputSelection((1,), True).pick(("a", "b")) == "b"


BY_REGIONS = CallerFacts(compiled_by_regions=True)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_split_graph_with_a_symbolic_first_block_equals_the_reference(family):
    model, pixels = build(family, depth=5, width=32, heads=2, batch=2)
    [(gm, inputs)] = capture_graphs(model, pixels)
    policy = ToMe(r=2)
    result = rewrite_graph(gm, inputs, Config(vision=policy), facts=BY_REGIONS)
    assert result.changed, result.reason
    assert any(kind == "symbolic_first_block" for kind, _ in result.context.changes)
    with torch.no_grad():
        plan = regions.plan_regions(result.gm, result.match.blocks)
        got = regions.compile_regions(plan, _eager)(*inputs)
    want = reference_forward(model, pixels, policy)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, next(iter(want.values())), atol=1e-5, rtol=1e-5)


def test_with_a_symbolic_first_block_every_tome_block_shares_one_compile():
    result, _ = _rewritten("timm_vit", ToMe(r=2), depth=5, facts=BY_REGIONS)
    plan = regions.plan_regions(result.gm, result.match.blocks)
    # Block 0 reads its token count from its input and biases its attention by its sizes (all 1) as blocks 1-3
    # do; block 4 returns no sizes and borrows their compile.
    assert plan.groups == [["submod_0"], ["submod_1", "submod_2", "submod_3", "submod_4"], ["submod_5"],
                           ["submod_6"]]
    assert plan.lenders == {2: (1, regions.OutputSelection((0,), single=True))}
    assert plan.compiles == 3


def test_with_a_symbolic_first_block_topk_blocks_share_one_compile_per_structure():
    model, pixels = build("timm_vit", depth=6, width=32, heads=2, batch=2)
    [(gm, inputs)] = capture_graphs(model, pixels)
    policy = TopK(layers=(2, 4), keep=0.5)
    result = rewrite_graph(gm, inputs, Config(vision=policy), facts=BY_REGIONS)
    plan = regions.plan_regions(result.gm, result.match.blocks)
    groups = {name: i for i, group in enumerate(plan.groups) for name in group}
    assert groups["submod_1"] == groups["submod_2"] == groups["submod_4"] == groups["submod_6"]   # plain blocks
    # Blocks 2 and 4 keep half of 17 and of 9 tokens' patches: the kept count is computed from the input's size.
    assert groups["submod_3"] == groups["submod_5"] != groups["submod_1"]
    assert plan.compiles == 4
    with torch.no_grad():
        got = regions.compile_regions(plan, _eager)(*inputs)
    want = next(iter(reference_forward(model, pixels, policy).values()))
    torch.testing.assert_close(got[0] if isinstance(got, (tuple, list)) else got, want, atol=1e-5, rtol=1e-5)


def test_topk_groups_plain_and_pruning_blocks_apart():
    result, _ = _rewritten("timm_vit", TopK(layers=(1, 3), keep=0.5), depth=5)
    plan = regions.plan_regions(result.gm, result.match.blocks)
    groups = {name: i for i, group in enumerate(plan.groups) for name in group}
    assert groups["submod_1"] != groups["submod_2"]             # block 0 plain, block 1 prunes
    assert groups["submod_2"] != groups["submod_4"]             # pruning at a static vs a symbolic count
    assert groups["submod_3"] == groups["submod_5"]             # plain blocks after cuts share
    assert len(plan.groups) < plan.regions


def test_signature_compares_structure_and_static_sizes():
    def traced(rows, fn=lambda x: (x.relu() + 1).sum(-1)):
        gm = torch.fx.symbolic_trace(fn)
        gm.graph.find_nodes(op="placeholder")[0].meta["val"] = torch.empty(rows, 4)
        return gm

    assert regions.region_signature(traced(3)) == regions.region_signature(traced(3))
    assert regions.region_signature(traced(3)) != regions.region_signature(traced(5))
    assert regions.region_signature(traced(3)) != regions.region_signature(traced(3, lambda x: x.relu().sum(-1)))


@pytest.fixture
def compile_fx_eager(monkeypatch):
    """Inductor's compile_fx replaced by eager execution, counting its calls (the backend's wiring is
    under test here, Inductor itself in test_inductor.py)."""
    import torch._inductor.compile_fx as inductor

    calls = []

    def compile_fx(gm, example_inputs, **unused):
        calls.append(gm)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    return calls


def test_backend_compiles_one_region_per_group(compile_fx_eager):
    model, pixels = build("hf_vit", depth=5, width=32, heads=2, batch=2)
    policy = ToMe(r=2)
    compiled = torch.compile(model, backend="tokensparse", options={"policy": policy})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        with torch.no_grad():
            got = main_outputs(compiled(pixels))
    assert len(compile_fx_eager) == 3          # before, blocks 0-4 (block 4 keeps one of their outputs), after
    want = reference_forward(model, pixels, policy)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], atol=1e-5, rtol=1e-5)


def test_backend_falls_back_to_the_whole_graph_when_splitting_fails(compile_fx_eager, monkeypatch):
    def broken(*args):
        raise RuntimeError("cannot split here")

    monkeypatch.setattr(regions, "split_at_blocks", broken)
    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    policy = TopK(layers=(1,), keep=0.5)
    compiled = torch.compile(model, backend="tokensparse", options={"policy": policy})
    with pytest.warns(TokensparseWarning, match=r"regional compilation failed \(RuntimeError: cannot split"):
        with torch.no_grad():
            got = compiled(pixels)
    assert len(compile_fx_eager) == 1
    torch.testing.assert_close(got, reference_forward(model, pixels, policy)["logits"], atol=1e-5, rtol=1e-5)


def test_regional_false_compiles_the_whole_graph(compile_fx_eager):
    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    compiled = torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 2, "regional": False})
    with torch.no_grad():
        compiled(pixels)
    assert len(compile_fx_eager) == 1


def test_signature_renames_unbacked_sizes_by_pattern():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    counts = [mode.shape_env.create_unbacked_symint() for _ in range(3)]

    def traced(first, second):
        gm = torch.fx.symbolic_trace(lambda x, y: x.sum(0) + y.sum(0))
        with mode:
            values = [torch.empty(first, 4), torch.empty(second, 4)]
        for node, value in zip(gm.graph.find_nodes(op="placeholder"), values):
            node.meta["val"] = value
        return regions.region_signature(gm)

    assert traced(counts[0], counts[0]) == traced(counts[1], counts[1])   # one count read twice
    assert traced(counts[0], counts[0]) != traced(counts[1], counts[2])   # two independent counts
    assert traced(counts[0], 7) != traced(counts[1], 8)                   # static sizes must agree
