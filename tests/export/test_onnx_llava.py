"""to_onnx on a LLaVA language model: ONNX Runtime runs the pruned prefill (standard ops only: the kept
count is data-dependent, so NonZero) and its logits equal the masking oracle's at the kept positions,
at batch sizes 1, 2 and 5 and on inputs other than the traced ones."""

import onnx
import onnxruntime
import pytest
import torch

from tests.models import build_llava
from tokensparse import Config
from tokensparse.export import to_onnx
from tokensparse.deploy.trt_check import check_tensorrt
from tokensparse.policies import DivPrune, FastV, PyramidDrop, ToMe, VisionZip, VisualExit
from tokensparse.reference.llava import masked_forward


def _ort_logits(path: str, inputs: dict) -> torch.Tensor:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {value.name: inputs[value.name].numpy() for value in session.get_inputs()}
    return torch.from_numpy(session.run(None, feed)[0])


def _oracle_at_kept(model, inputs: dict, policy, vision=None) -> torch.Tensor:
    reference = masked_forward(model, inputs, policy, vision=vision)
    logits, kept = reference["logits"], reference["kept"]
    return logits.gather(1, kept.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _export_and_compare(tmp_path, policy, batch: int, vision=None, **sizes):
    model, traced = build_llava(batch=batch, **sizes)
    result = to_onnx(model, traced, Config(vision=vision, llm=policy), str(tmp_path / "llava.onnx"), dynamic=False)
    assert result.changed, result.reason
    assert result.input_names == ["input_ids", "pixel_values"]
    _, other = build_llava(batch=batch, seed=batch + 100, **sizes)         # not the traced example
    got = _ort_logits(result.path, other)
    want = _oracle_at_kept(model, other, policy, vision)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return result


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_fastv_onnx_runtime_matches_the_masking_oracle(tmp_path, batch):
    result = _export_and_compare(tmp_path, FastV(layer=2, keep=0.25), batch)
    ops = {node.op_type for node in onnx.load(result.path).graph.node}
    assert {"TopK", "NonZero", "GatherElements"} <= ops
    assert {node.domain for node in onnx.load(result.path).graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("policy", [FastV(layer=3, keep=0.5, query="text"), PyramidDrop(layers=(1, 3), ratio=0.5),
                                    PyramidDrop(layers=(1, 3), ratio=0.5, positions="compact"), VisualExit(layer=3)],
                         ids=["fastv_text", "pyramiddrop", "pyramiddrop_compact", "exit"])
def test_other_language_policies_export(tmp_path, policy):
    _export_and_compare(tmp_path, policy, 2)


def test_tome_in_the_tower_then_fastv_exports(tmp_path):
    """ToMe in the tower up to its feature layer (-2 of 3), the tokens' source rows and both cuts, in one ONNX
    graph of standard ops."""
    result = _export_and_compare(tmp_path, FastV(layer=2, keep=0.5), 2, vision=ToMe(r=3), vision_layers=3,
                                 feature_layer=-2)
    assert {node.domain for node in onnx.load(result.path).graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("batch", [1, 5])
def test_visionzip_onnx_runtime_matches_the_masking_oracle(tmp_path, batch):
    """The vision tower's feature layer (-2 of 3) and the language model's cut, in one ONNX graph."""
    result = _export_and_compare(tmp_path, VisionZip(dominant=5, contextual=2), batch, vision_layers=3,
                                 feature_layer=-2)
    assert {node.domain for node in onnx.load(result.path).graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("batch, keep", [(1, 0.3), (2, 0.1)])
def test_divprune_onnx_runtime_matches_the_masking_oracle(tmp_path, batch, keep):
    """The greedy max-min selection is an ONNX Loop whose trip count comes from the image mask."""
    result = _export_and_compare(tmp_path, DivPrune(keep=keep), batch)
    ops = {node.op_type for node in onnx.load(result.path).graph.node}
    assert "Loop" in ops
    report = check_tensorrt(result.path)
    assert report.ok, report


def test_a_left_padded_batch_exports(tmp_path):
    """Padding queries mask every key: the exported attention gives them zeros, as SDPA does (a NaN there would
    reach the next layer's keys and every sample's logits)."""
    model, traced = build_llava(batch=2)
    policy = FastV(layer=2, keep=0.25)
    padded = dict(traced, attention_mask=torch.ones_like(traced["input_ids"]))
    padded["attention_mask"][0, :2] = 0
    result = to_onnx(model, padded, Config(llm=policy), str(tmp_path / "padded.onnx"), dynamic=False)
    assert result.changed, result.reason
    assert result.input_names == ["input_ids", "pixel_values", "attention_mask"]
    _, other = build_llava(batch=2, seed=102)
    other["attention_mask"] = torch.ones_like(other["input_ids"])
    other["attention_mask"][1, :3] = 0
    got = _ort_logits(result.path, other)
    assert not got.isnan().any()
    torch.testing.assert_close(got, _oracle_at_kept(model, other, policy), rtol=1e-4, atol=1e-5)


def test_a_model_that_fixes_its_batch_gets_a_clear_error(tmp_path):
    model, inputs = build_llava(batch=1)
    with pytest.raises(ValueError, match="cannot be exported with a dynamic batch axis: export with dynamic=False"):
        to_onnx(model, inputs, Config(llm=FastV()), str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_a_kv_policy_is_named_as_not_exported(tmp_path):
    from tokensparse import SnapKV

    model, inputs = build_llava(batch=1)
    with pytest.warns(UserWarning, match="kv=snapkv is not exported") as caught:
        result = to_onnx(model, inputs, Config(kv=SnapKV(budget=8, window=4)), str(tmp_path / "kv.onnx"), dynamic=False)
    assert not result.changed
    assert all("unchanged" not in str(warning.message) for warning in caught)


def test_a_dropped_kv_policy_does_not_say_the_vision_policy_was_dropped(tmp_path):
    from tests.models import build
    from tokensparse import SnapKV, ToMe

    model, pixels = build("timm_vit")
    with pytest.warns(UserWarning, match="kv=snapkv is not exported.*; exporting the rest of the config"):
        result = to_onnx(model, (pixels,), Config(vision=ToMe(r=2), kv=SnapKV(budget=8, window=4)),
                         str(tmp_path / "vit.onnx"))
    assert result.changed
