"""rewrite_onnx on ONNX files as users have them: Hugging Face ViTs from the TorchScript-based exporter
(symbolic sizes, dynamic batch) at opsets 13-18, a timm ViT from the dynamo exporter at opset 17. Older
opsets are upgraded in memory and written at 18; the result equals the eager pruned reference in ONNX
Runtime at batch 1 and 3. What cannot be upgraded is refused with the converter's reason."""

import hashlib
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from tests.models import build
from tokensparse import Config, ToMe, TokensparseWarning, TopK
from tokensparse.export import rewrite_onnx
from tokensparse.reference import reference_forward

# (opset, attention implementation): SDPA exports from opset 14; eager attention writes Softmax -> Cast -> Cast.
EXPORTS = {"opset13-eager": (13, "eager"), "opset14-sdpa": (14, "sdpa"), "opset17-sdpa": (17, "sdpa"),
           "opset18-sdpa": (18, "sdpa"), "opset18-eager": (18, "eager")}
POLICIES = {"tome": ToMe(r=3), "topk_fuse": TopK(layers=(0, 2), keep=0.6, fuse=True)}
OUTPUTS = ["last_hidden_state", "pooler_output"]


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _opset(path):
    return next(entry.version for entry in onnx.load(path).opset_import if entry.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def hf_vits():
    return {attention: build("hf_vit", depth=3, width=32, heads=2, batch=2, attn_implementation=attention)
            for attention in ("eager", "sdpa")}


@pytest.fixture(scope="module", params=list(EXPORTS))
def torchscript_export(request, hf_vits, tmp_path_factory):
    """An HF ViT as Hugging Face's exporters write it: torch.onnx.export(dynamo=False), dynamic batch."""
    opset, attention = EXPORTS[request.param]
    model, pixels = hf_vits[attention]
    path = str(tmp_path_factory.mktemp("torchscript") / f"vit_{opset}.onnx")
    dynamic = {name: {0: "batch"} for name in ["pixel_values", *OUTPUTS]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the TorchScript-based exporter's deprecation warning
        torch.onnx.export(model, (pixels,), path, dynamo=False, opset_version=opset, input_names=["pixel_values"],
                          output_names=OUTPUTS, dynamic_axes=dynamic)
    assert _opset(path) == opset
    return model, path, opset


@pytest.fixture(scope="module", params=list(POLICIES))
def rewritten(request, torchscript_export, tmp_path_factory):
    model, path, opset = torchscript_export
    policy = POLICIES[request.param]
    before = _digest(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TokensparseWarning)
        report = rewrite_onnx(path, str(tmp_path_factory.mktemp("rewritten") / "pruned.onnx"), Config(vision=policy))
    assert _digest(path) == before
    report.warnings = [str(warning.message) for warning in caught if warning.category is TokensparseWarning]
    return model, policy, report, opset


def _assert_equals_reference(onnx_path, model, policy, names):
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
        with torch.no_grad():
            want = reference_forward(model, pixels, policy)
        for name, value in zip(names, got):
            assert value.shape == tuple(want[name].shape), name
            np.testing.assert_allclose(value, want[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_torchscript_export_rewrite_equals_reference(rewritten):
    model, policy, report, _ = rewritten
    assert report.changed, report.reason
    assert report.warnings == []
    assert report.tokens_in[-1] < report.tokens_in[0] == 65
    _assert_equals_reference(report.written, model, policy, OUTPUTS)


def test_older_opset_is_upgraded_in_memory_and_written_at_18(rewritten):
    _, _, report, opset = rewritten
    assert report.changed, report.reason
    assert _opset(report.written) == 18
    onnx.checker.check_model(onnx.load(report.written), full_check=True)
    upgraded = [note for note in report.notes if "upgraded from opset" in note]
    assert upgraded == ([f"upgraded from opset {opset} to 18 with onnx's version converter (in memory; the "
                         f"rewritten model is written at opset 18)"] if opset < 18 else [])
    assert any("symbolic shape inference" in note for note in report.notes)


def test_timm_vit_from_the_dynamo_exporter_at_opset_17(tmp_path):
    model, pixels = build("timm_vit", depth=2, width=32, heads=2, batch=2)
    path = str(tmp_path / "timm_17.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (pixels,), dynamo=True, opset_version=17, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},)).save(path)
    assert _opset(path) == 17
    policy = ToMe(r=3)
    report = rewrite_onnx(path, str(tmp_path / "pruned.onnx"), Config(vision=policy))
    assert report.changed, report.reason
    assert _opset(report.written) == 18
    _assert_equals_reference(report.written, model, policy, ["logits"])


def test_model_that_cannot_be_upgraded_is_refused_with_the_converters_reason(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0)], "scaler", [x], [y])
    path = str(tmp_path / "opset9.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), path)
    before = _digest(path)
    with pytest.warns(TokensparseWarning, match=r"the model uses opset 9; onnx's version converter could not "
                                                r"upgrade it to 18 \(it uses ImageScaler, which ONNX does not "
                                                r"define at opset 18\): an op has no registered schema"):
        report = rewrite_onnx(path, str(tmp_path / "out.onnx"), {"policy": "tome", "r": 2})
    assert not report.changed and not (tmp_path / "out.onnx").exists()
    assert _digest(path) == before
