"""--check-trt: the pruned exports use only operators TensorRT parses; unsupported ops, custom domains
and a TopK above 3840 are reported."""

import pytest
from onnx import TensorProto, helper

from tests.models import build
from tokensparse import Config, ToMe, TopK
from tokensparse.export import to_onnx
from tokensparse.deploy.trt_check import check_tensorrt


@pytest.mark.parametrize("policy", [ToMe(r=3), TopK(layers=(1,), keep=0.5, fuse=True)], ids=["tome", "topk"])
def test_pruned_exports_are_tensorrt_compatible(policy, tmp_path):
    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    result = to_onnx(model, (pixels,), Config(vision=policy), str(tmp_path / "m.onnx"))
    report = check_tensorrt(result.path)
    assert report.ok, str(report)
    assert "TopK" in report.op_counts and "compatible" in str(report)


def _model(nodes, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_topk_above_the_limit_unsupported_ops_and_custom_domains_are_errors():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    model = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="big_topk"),
                    helper.make_node("Unique", ["x"], ["u"], name="uniq"),
                    helper.make_node("Merge", ["x"], ["m"], name="plugin", domain="tokensparse")], [k])
    report = check_tensorrt(model)
    text = str(report)
    assert not report.ok
    assert "K=4000 is not below TensorRT's limit of 3840" in text
    assert "Unique 'uniq': not supported" in text
    assert "custom domain 'tokensparse'" in text


def test_opset_outside_the_range_is_reported():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], opset=8)
    report = check_tensorrt(model)
    assert not report.ok and "opset 8 is outside TensorRT 10.15's range 9..24" in str(report)
    assert check_tensorrt(_model([helper.make_node("Relu", ["x"], ["y"])])).ok
