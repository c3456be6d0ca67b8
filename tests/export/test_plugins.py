"""Plugin nodes: to_onnx(..., plugins=True) writes one "tokensparse" node per policy step with TensorRT's
plugin attributes; the plugins' token arithmetic; a clear error without TensorRT."""

import importlib.util

import onnx
import pytest
from onnx import helper

from tests.models import build
from tokensparse import Config, ToMe, TopK
from tokensparse.export import to_onnx
from tokensparse.export.trt_check import check_tensorrt
from tokensparse.export.trt_plugins import register_plugins, tome_merge_tokens, topk_prune_tokens


@pytest.mark.parametrize("policy, op_type, count", [(ToMe(r=3), "TomeMerge", 3),
                                                    (TopK(layers=(1,), keep=0.5, fuse=True), "TopKPrune", 1)],
                         ids=["tome", "topk"])
def test_plugin_nodes_replace_the_standard_lowering(policy, op_type, count, tmp_path):
    model, pixels = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    result = to_onnx(model, (pixels,), Config(vision=policy), str(tmp_path / "m.onnx"), plugins=True)
    proto = onnx.load(result.path)
    nodes = [node for node in proto.graph.node if node.domain == "tokensparse"]
    assert [node.op_type for node in nodes] == [op_type] * count
    attributes = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["plugin_namespace"] == b"tokensparse" and attributes["plugin_version"] == b"1"
    assert "TopK" not in {node.op_type for node in proto.graph.node if node.domain == ""}
    onnx.checker.check_model(proto)
    report = check_tensorrt(proto)
    assert report.ok and "tokensparse plugin node: register the plugin" in str(report)


def test_plugin_token_counts():
    assert tome_merge_tokens(197, 13) == 184
    assert topk_prune_tokens(keep=98, protected=1, fuse=1) == 100


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_register_plugins_names_what_is_missing():
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        register_plugins()
