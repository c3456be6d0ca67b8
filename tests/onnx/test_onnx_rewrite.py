"""rewrite_onnx on models exported by torch.onnx without tokensparse: the result equals the torch-side
pruned export in ONNX Runtime (batch 1, 2, 5); bad files give clear errors and are never modified."""

import hashlib
import os
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.models import build
from tokensparse import Config, ToMe, TokensparseWarning, TopK
from tokensparse.export import load_onnx, rewrite_onnx, to_onnx

CASES = {
    "timm_vit-tome": ("timm_vit", ToMe(r=3)),
    "timm_vit-topk_fuse": ("timm_vit", TopK(layers=(0, 2), keep=0.6, fuse=True)),
    "timm_deit_distilled-topk": ("timm_deit_distilled", TopK(layers=(1,), keep=0.5)),
    "hf_vit-tome": ("hf_vit", ToMe(r=3)),               # all-true attention mask, dropped after the cut
    "hf_siglip-tome_decreasing": ("hf_siglip", ToMe(r=4, schedule="decreasing")),  # pooling-head attention
    "hf_dinov2-topk": ("hf_dinov2", TopK(layers=(1,), keep=0.5)),
}


def _plain_export(model, pixels, path):
    program = torch.onnx.export(model, (pixels,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(path))
    return str(path)


def _run(path, pixels):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels.numpy()})


@pytest.fixture(scope="module", params=list(CASES))
def rewritten(request, tmp_path_factory):
    family, policy = CASES[request.param]
    model, pixels = build(family, depth=3, width=32, heads=2, batch=2)
    directory = tmp_path_factory.mktemp("onnx_rewrite")
    plain = _plain_export(model, pixels, directory / "plain.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        report = rewrite_onnx(plain, str(directory / "native.onnx"), Config(vision=policy))
    torch_side = to_onnx(model, (pixels,), Config(vision=policy), str(directory / "torch_side.onnx"))
    return report, torch_side


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_onnx_native_rewrite_equals_torch_side_export(rewritten, batch):
    report, torch_side = rewritten
    assert report.changed, report.reason
    assert torch_side.changed, torch_side.reason
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    got, want = _run(report.written, pixels), _run(torch_side.path, pixels)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_report_names_blocks_and_token_counts(rewritten):
    report, _ = rewritten
    text = str(report)
    assert f"{report.blocks} block(s)" in text and "tokens entering each block" in text
    assert report.tokens_in[-1] < report.tokens_in[0]


@pytest.fixture(scope="module")
def plain_vit(tmp_path_factory):
    model, pixels = build("timm_vit", depth=2, width=32, heads=2, batch=2)
    return _plain_export(model, pixels, tmp_path_factory.mktemp("plain") / "vit.onnx")


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_truncated_and_foreign_files_are_refused_clearly(plain_vit, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(open(plain_vit, "rb").read()[:5000])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    for path in (truncated, text):
        before = _digest(path)
        with pytest.raises(ValueError, match="is not (an|a valid) ONNX model"):
            rewrite_onnx(str(path), str(tmp_path / "out.onnx"), {"policy": "tome", "r": 2})
        assert _digest(path) == before
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        load_onnx(str(tmp_path / "missing.onnx"))
    assert not (tmp_path / "out.onnx").exists()


def test_input_file_is_never_modified_and_cannot_be_the_output(plain_vit, tmp_path):
    before = _digest(plain_vit)
    rewrite_onnx(plain_vit, str(tmp_path / "pruned.onnx"), {"policy": "tome", "r": 2})
    assert _digest(plain_vit) == before
    with pytest.raises(ValueError, match="is the input file"):
        rewrite_onnx(plain_vit, plain_vit, {"policy": "tome", "r": 2})
    symlink, hardlink = tmp_path / "symlink.onnx", tmp_path / "hardlink.onnx"
    os.symlink(plain_vit, symlink)
    os.link(plain_vit, hardlink)
    for link in (symlink, hardlink):
        with pytest.raises(ValueError, match=r"is the input file .* \(or a link to it\)"):
            rewrite_onnx(plain_vit, str(link), {"policy": "tome", "r": 2})
    assert _digest(plain_vit) == before


@pytest.mark.parametrize("options", [{"policy": "fastv"}, {"policy": "visionzip"}, {"policy": "snapkv"}])
def test_policy_without_onnx_native_rewrite_is_a_clear_error(plain_vit, tmp_path, options):
    with pytest.raises(ValueError, match="rewrite_onnx rewrites vision transformers with ToMe or TopK; the config has"):
        rewrite_onnx(plain_vit, str(tmp_path / "out.onnx"), options)
    assert not (tmp_path / "out.onnx").exists()


def test_model_without_attention_is_not_written_and_says_why(tmp_path):
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    path = str(tmp_path / "mlp.onnx")
    torch.onnx.export(mlp, (torch.randn(2, 8),), dynamo=True, verbose=False).save(path)
    with pytest.warns(TokensparseWarning, match="no attention found"):
        report = rewrite_onnx(path, str(tmp_path / "out.onnx"), {"policy": "tome", "r": 2})
    assert not report.changed and not (tmp_path / "out.onnx").exists()
    assert "not rewritten: no attention found" in str(report)


def test_layer_past_depth_is_a_value_error(plain_vit, tmp_path):
    with pytest.raises(ValueError, match="block 5 is past the model's depth"):
        rewrite_onnx(plain_vit, str(tmp_path / "out.onnx"), {"policy": "topk", "layers": [5]})


def test_rewritten_model_passes_the_onnx_checker(rewritten):
    report, _ = rewritten
    onnx.checker.check_model(onnx.load(report.written), full_check=True)


def test_explain_without_output_writes_nothing(plain_vit, tmp_path):
    report = rewrite_onnx(plain_vit, None, {"policy": "tome", "r": 2}, explain=True)
    text = str(report)
    assert "tokens entering each block: 65 -> 63 -> 61" in text and "nothing written" in text
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_reduce_writes_nothing_and_says_so(plain_vit, tmp_path):
    with pytest.warns(TokensparseWarning, match="nothing to reduce"):
        report = rewrite_onnx(plain_vit, str(tmp_path / "same.onnx"), {"policy": "tome", "r": 0})
    assert not report.changed and not (tmp_path / "same.onnx").exists()


def test_prefix_tokens_past_the_models_prefix_is_a_value_error(plain_vit, tmp_path):
    with pytest.raises(ValueError, match=r"prefix_tokens=3 is more than the model's 1 prefix token\(s\)"):
        rewrite_onnx(plain_vit, str(tmp_path / "out.onnx"), {"policy": "tome", "r": 2, "prefix_tokens": 3})
    assert not (tmp_path / "out.onnx").exists()
