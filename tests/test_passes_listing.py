"""tokensparse.passes(): every pass list of both front ends, in the order it runs, each pass with a one-line
docstring."""

import pytest

import tokensparse
from tokensparse.fx.passes import KV_CHECKS, KV_PASSES, PASSES, PRUNED_STATIC_DECODE_PASSES
from tokensparse.pipeline import summary

pytest.importorskip("onnx_ir")
from tokensparse.onnx.passes import ONNX_PASSES  # noqa: E402

LISTS = {"PASSES": PASSES, "KV_PASSES": KV_PASSES, "KV_CHECKS": KV_CHECKS,
         "PRUNED_STATIC_DECODE_PASSES": PRUNED_STATIC_DECODE_PASSES, "ONNX_PASSES": ONNX_PASSES}


@pytest.mark.parametrize("name", LISTS)
def test_lists_every_pass_in_order(name):
    listing = tokensparse.passes()
    assert listing.names(name) == [rewrite_pass.__name__ for rewrite_pass in LISTS[name]]
    text = str(listing)
    assert repr(listing) == text
    section = text.split(f".{name}:\n", 1)[1].split("\ntokensparse.", 1)[0].splitlines()
    assert [line.split()[1] for line in section] == listing.names(name)
    for index, (line, rewrite_pass) in enumerate(zip(section, LISTS[name]), 1):
        assert line.split()[0] == f"{index}."
        assert line.rstrip().endswith(summary(rewrite_pass))


@pytest.mark.parametrize("rewrite_pass", sorted({p for passes in LISTS.values() for p in passes}, key=lambda p: p.__name__),
                         ids=lambda p: p.__name__)
def test_every_pass_has_a_one_line_docstring(rewrite_pass):
    doc = rewrite_pass.__doc__
    assert doc and len(doc.strip().splitlines()) == 1, rewrite_pass.__name__


def test_lists_in_front_end_order():
    modules = [(module, name) for module, name, _ in tokensparse.passes().lists]
    assert modules == [("tokensparse.fx.passes", "PASSES"), ("tokensparse.fx.passes", "KV_PASSES"),
                       ("tokensparse.fx.passes", "KV_CHECKS"), ("tokensparse.fx.passes", "PRUNED_STATIC_DECODE_PASSES"),
                       ("tokensparse.onnx.passes", "ONNX_PASSES")]


def test_run_passes_applies_in_order_and_raises_match_failure_through():
    from tokensparse.pipeline import MatchFailure, run_passes

    def add_one(target, ctx):
        """Append 1."""
        ctx.append("add_one")
        return target + [1]

    def refuse(target, ctx):
        """Refuse."""
        raise MatchFailure("no match here")

    ran = []
    assert run_passes((add_one, add_one), [], ran) == [1, 1]
    assert ran == ["add_one", "add_one"]
    with pytest.raises(MatchFailure, match="no match here"):
        run_passes((add_one, refuse, add_one), [], ran)
    assert ran == ["add_one"] * 3
