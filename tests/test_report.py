"""explain(): the report's blocks, tokens and FLOPs, its table, its picture, and unmatched models."""

import pytest
import torch

import tokensparse
from tests.models import build


@pytest.fixture(scope="module")
def tome_report():
    model, pixels = build("timm_vit", depth=4, batch=2)
    return tokensparse.explain(model, pixels, policy="tome", r=8)


def test_report_tokens_and_flops(tome_report):
    report = tome_report
    assert report.changed and report.prefix_tokens == 1 and report.grid == (8, 8)
    assert [row.tokens_after for row in report.blocks] == [65, 57, 49, 41]
    assert [row.tokens_out for row in report.blocks] == [57, 49, 41, 33]
    assert [row.path for row in report.blocks] == [f"blocks.{i}" for i in range(4)]
    for row in report.blocks[1:]:
        assert row.flops_after < row.flops_before
    assert report.flops_before > report.flops_after > 0
    assert report.flops_ideal_ratio >= report.flops_ratio > 1.0


def test_report_flops_match_hand_count():
    model, pixels = build("timm_vit", depth=2, width=32, heads=2, batch=2)
    report = tokensparse.explain(model, pixels, policy="topk", layers=[0], keep=0.5)
    n, c, b, hidden = 65, 32, 2, 128
    per_block = 2 * b * n * (3 * c * c + c * c + 2 * c * hidden) + 4 * b * n * n * c  # linears + attention
    assert report.blocks[0].flops_before == per_block


def test_report_table_and_picture(tome_report, tmp_path):
    text = str(tome_report)
    assert "blocks.3" in text and "FLOPs-ideal speedup" in text and "prefix tokens: 1" in text
    path = tmp_path / "merges.png"
    tome_report.save_png(path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_reports_of_other_batch_sizes_count_and_draw_their_own(tome_report, tmp_path):
    """A second explain() of the same model class with another batch is traced for that batch (not with the
    symbolic sizes dynamo would choose after a first shape), and its picture is drawn into a new directory."""
    for batch in (3, 1):
        model, pixels = build("timm_vit", depth=4, batch=batch)
        report = tokensparse.explain(model, pixels, policy="tome", r=8)
        assert report.flops_before * 2 == tome_report.flops_before * batch
        assert [row.tokens_out for row in report.blocks] == [57, 49, 41, 33]
        path = tmp_path / f"batch{batch}" / "merges.png"
        report.save_png(path)
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_topk_picture_marks_dropped_patches(tmp_path):
    from tokensparse.viz import token_groups

    model, pixels = build("timm_vit", depth=3, batch=1)
    report = tokensparse.explain(model, pixels, policy="topk", layers=[1], keep=0.25, fuse=True)
    report.save_png(tmp_path / "topk.png")
    from tokensparse.policies.base import recorder

    with torch.no_grad(), recorder.recording() as entries:
        report._result.gm(*report._inputs)
    (tokens,) = token_groups(entries, 1, 64)
    assert len(tokens) == 1 + 16 + 1                        # CLS, kept, fused
    assert set().union(*tokens) == set(range(64))           # the fused token holds the dropped patches


def test_unmatched_model_reports_reason():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    report = tokensparse.explain(model, torch.randn(2, 3, 4), policy="tome", r=2)
    assert not report.changed and "no attention found" in report.reason
    assert "unchanged: no attention found" in str(report)
    with pytest.raises(ValueError, match="nothing to draw"):
        report.save_png("never.png")


def test_vlm_report_counts_tokens_per_decoder_layer():
    from tests.models import build_llava

    model, inputs = build_llava(text_layers=6, image_tokens=16, prompt=(3, 5))
    report = tokensparse.explain(model, inputs, policy="pyramiddrop", layers=[2, 4], ratio=0.5)
    assert report.changed and [row.path for row in report.blocks] == [f"model.language_model.layers.{i}" for i in range(6)]
    assert [row.tokens_after for row in report.blocks] == [24, 24, 16, 16, 12, 12]
    assert [row.tokens_out for row in report.blocks] == [24, 16, 16, 12, 12, 12]
    assert all(row.flops_after < row.flops_before for row in report.blocks[2:])
    assert report.blocks[0].flops_after == report.blocks[0].flops_before
    assert report.flops_policy > 0 and report.flops_ideal_ratio > report.flops_ratio > 1.0
    assert "vision span: " in str(report) and "model.language_model.layers" in str(report)


def test_vlm_report_with_an_attention_mask_says_what_compile_does():
    """tokensparse.compile prunes a prompt with an attention mask (its decode steps follow the pruned cache), so
    explain must too: it used to report the mask as a reason to change nothing."""
    from tests.models import build_llava

    model, inputs = build_llava(text_layers=6, image_tokens=16, prompt=(3, 5))
    plain = tokensparse.explain(model, inputs, policy="pyramiddrop", layers=[2, 4], ratio=0.5)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :2] = 0
    masked = tokensparse.explain(model, {**inputs, "attention_mask": mask}, policy="pyramiddrop", layers=[2, 4],
                                 ratio=0.5)
    assert masked.changed, masked.reason
    assert [row.tokens_after for row in masked.blocks] == [row.tokens_after for row in plain.blocks]
    assert masked.flops_ideal_ratio == pytest.approx(plain.flops_ideal_ratio)


def test_qwen2_vl_report_follows_generate_prefill():
    """Qwen2-VL's forward alone splits the merge from the layers (its M-RoPE positions need .tolist()):
    explain() reads the prefill graph that generate() runs."""
    from tests.models import build_qwen2_vl

    model, inputs = build_qwen2_vl(image=(4, 4), repeated=(1, 3))
    report = tokensparse.explain(model, inputs, policy="dtd", tau=0.9)
    assert report.changed and len(report.blocks) == 4
    assert [row.tokens_after for row in report.blocks] == [83 - 32] * 4       # 2 of 4 temporal patches repeat
    assert report.flops_ideal_ratio > 1.5
