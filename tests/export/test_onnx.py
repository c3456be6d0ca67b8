"""to_onnx: ONNX Runtime runs the pruned export and matches the eager policy reference at batch sizes
1, 2 and 5 (the batch axis is dynamic); no custom ops are left in the file."""

import onnx
import onnxruntime
import pytest
import torch

from tests.models import build
from tokensparse import Config, ToMe, TopK
from tokensparse.export import to_onnx
from tokensparse.reference import reference_forward

CASES = {
    "timm_vit-tome": ("timm_vit", ToMe(r=3)),
    "timm_deit_distilled-topk": ("timm_deit_distilled", TopK(layers=(1,), keep=0.5)),
    "hf_clip-topk_fuse": ("hf_clip", TopK(layers=(0, 2), keep=0.6, fuse=True)),
    "hf_siglip-tome_decreasing": ("hf_siglip", ToMe(r=4, schedule="decreasing")),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    family, policy = CASES[request.param]
    model, pixels = build(family, depth=3, width=32, heads=2, batch=2)
    path = str(tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    result = to_onnx(model, (pixels,), Config(vision=policy), path)
    return model, policy, result


def _first_output(want: dict) -> torch.Tensor:
    return want["logits"] if "logits" in want else want["last_hidden_state"]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_onnx_runtime_matches_reference(exported, batch):
    model, policy, result = exported
    assert result.changed, result.reason
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    [got, *_] = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        want = _first_output(reference_forward(model, pixels, policy))
    assert got.shape == tuple(want.shape)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_only_standard_onnx_ops(exported):
    _, _, result = exported
    model = onnx.load(result.path)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    ops = {node.op_type for node in model.graph.node}
    assert "TopK" in ops and "GatherElements" in ops


def test_outputs_are_named_after_the_model_outputs(exported):
    model, _, result = exported
    hf = type(model).__module__.startswith("transformers")
    assert result.output_names == (["last_hidden_state", "pooler_output"] if hf else ["output"])


def test_identity_policy_exports_the_unmodified_model(tmp_path):
    model, pixels = build("timm_vit", depth=2, width=32, heads=2, batch=3)
    result = to_onnx(model, (pixels,), {"policy": "tome", "r": 0}, str(tmp_path / "same.onnx"))
    assert not result.changed and "nothing to reduce" in result.reason
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    [got] = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(pixels), rtol=1e-4, atol=1e-5)


def test_bad_opset_is_refused_before_anything_is_written(tmp_path):
    model, pixels = build("timm_vit", depth=2)
    with pytest.raises(ValueError, match="opset=17 is out of range"):
        to_onnx(model, (pixels,), {"policy": "tome", "r": 2}, str(tmp_path / "x.onnx"), opset=17)
    assert not (tmp_path / "x.onnx").exists()
