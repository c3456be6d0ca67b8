"""Kernel plugins (plugins="kernel"): each plugin launched as TensorRT's AOT launch does (launch_like_tensorrt:
declared output shapes, input pointers, int32 scalars, output pointers, the declared grid) equals the policy's
PyTorch code; the exported ONNX, run with its plugin nodes launched that way, equals the eager reference."""

import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import helper

from tests.devices import KERNEL_DEVICE as DEVICE
from tests.models import build
from tokensparse import Config, ToMe, TopK
from tokensparse.export import to_onnx
from tokensparse.deploy.kernel_plugins import MERGE_ROWS, TOPK_SELECT, TOPK_SPLIT, launch_like_tensorrt
from tokensparse.deploy.plugin_eval import run_with_kernel_plugins
from tokensparse.deploy.trt_check import check_tensorrt
from tokensparse.policies.selection import top_k_in_order
from tokensparse.policies.tome import bipartite_soft_matching, merge_tokens
from tokensparse.reference import reference_forward


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(3, 70), channels=st.integers(1, 70), protected=st.integers(0, 2),
       r_share=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_merge_rows_launched_as_tensorrt_does(batch, tokens, channels, protected, r_share, seed):
    """Odd and even token counts, channels past one tile (64), r from 0 to half the tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = max(tokens, protected + 2)
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.rand(batch, tokens, 1, generator=generator) * 3 + 1
    r = int(r_share * ((tokens - protected) // 2))
    src, dst, unm = bipartite_soft_matching(torch.randn(batch, tokens, 8, generator=generator), r, protected)
    got_x, got_size = launch_like_tensorrt(MERGE_ROWS, [t.to(DEVICE) for t in (x, size, src, dst, unm)],
                                           {"protected": protected})
    want_x, want_size = merge_tokens(x, size, src, dst, unm, protected)
    assert got_x.shape == (batch, tokens - r, channels)
    torch.testing.assert_close(got_size.cpu(), want_size)
    torch.testing.assert_close(got_x.cpu(), want_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, tokens, k", [(2, 37, 5), (1, 3900, 3841)])
def test_topk_select_launched_as_tensorrt_does(batch, tokens, k):
    """k above TensorRT's TopK limit of 3840 too."""
    scores = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(tokens))
    [kept] = launch_like_tensorrt(TOPK_SELECT, [scores.to(DEVICE)], {"k": k})
    assert kept.dtype == torch.int64
    assert torch.equal(kept.cpu(), top_k_in_order(scores, k))


@pytest.mark.parametrize("batch, tokens, k, ties", [(2, 37, 5, True), (1, 98, 49, False), (2, 8, 8, False)])
def test_topk_split_launched_as_tensorrt_does(batch, tokens, k, ties):
    """ToMe's r best edges and the other A tokens, as the stable sort picks them (ties: lower index); k = N
    leaves an empty rest."""
    scores = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(tokens))
    scores = scores.round() if ties else scores
    kept, rest = launch_like_tensorrt(TOPK_SPLIT, [scores.to(DEVICE)], {"k": k})
    order = scores.argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(kept.cpu(), order[:, :k].sort(-1).values)
    assert torch.equal(rest.cpu(), order[:, k:].sort(-1).values)


CASES = {"tome": (ToMe(r=3), ["TopKSplit", "TomeMergeRows"] * 3),
         "topk_fuse": (TopK(layers=(1,), keep=0.5, fuse=True), ["TopKSelect"])}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    policy, op_types = CASES[request.param]
    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    path = str(tmp_path_factory.mktemp("kernel_plugins") / f"{request.param}.onnx")
    return model, policy, op_types, to_onnx(model, (pixels,), Config(vision=policy), path, plugins="kernel")


def test_one_node_per_kernel_with_the_rest_in_standard_ops(exported):
    """No TopK left (TensorRT caps its K at 3840), nor ScatterElements with a reduction."""
    _, _, op_types, result = exported
    proto = onnx.load(result.path)
    plugins = [node for node in proto.graph.node if node.domain == "tokensparse"]
    assert [node.op_type for node in plugins] == op_types
    assert "TopK" not in {node.op_type for node in proto.graph.node}
    assert not any(a.name == "reduction" and a.s != b"none" for node in proto.graph.node for a in node.attribute)
    attributes = {a.name: helper.get_attribute_value(a) for a in plugins[0].attribute}
    assert attributes["plugin_namespace"] == b"tokensparse" and attributes["plugin_version"] == b"1"
    onnx.checker.check_model(proto)
    report = check_tensorrt(proto)
    assert report.ok and "an ahead-of-time kernel: the engine runs from C++" in str(report)


@pytest.mark.parametrize("batch", [1, 3])
def test_plugin_kernels_in_the_exported_graph_equal_the_reference(exported, batch):
    """Batch 3 was not traced: the batch axis is dynamic. The unpruned model's output differs (a control)."""
    model, policy, _, result = exported
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    [got] = run_with_kernel_plugins(result.path, {result.input_names[0]: pixels.numpy()}, DEVICE)
    with torch.no_grad():
        want, unpruned = reference_forward(model, pixels, policy)["logits"], model(pixels)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(got), unpruned, atol=1e-3)


def test_an_unknown_plugin_mode_is_refused_before_anything_is_written(tmp_path):
    model, pixels = build("timm_vit", depth=1, width=32, heads=2, batch=1)
    with pytest.raises(ValueError, match=r"plugins='aot' is not one of \('step', 'kernel'\)"):
        to_onnx(model, (pixels,), Config(vision=ToMe(r=2)), str(tmp_path / "m.onnx"), plugins="aot")
    assert not (tmp_path / "m.onnx").exists()


def test_nothing_to_merge_exports_the_unmodified_model(tmp_path):
    """ToMe r=0 with plugins="kernel": no plugin node, and the unmodified model's output."""
    model, pixels = build("timm_vit", depth=2, width=32, heads=2, batch=2)
    result = to_onnx(model, (pixels,), Config(vision=ToMe(r=0)), str(tmp_path / "m.onnx"), plugins="kernel")
    assert not any(node.domain == "tokensparse" for node in onnx.load(result.path).graph.node)
    [got] = run_with_kernel_plugins(result.path, {result.input_names[0]: pixels.numpy()}, DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(pixels), rtol=1e-4, atol=1e-5)
