"""tools/accuracy.py's functions on a tiny setting (no timing): the result's structure, and ToMe r=0 giving exactly
the unpruned model's accuracy."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("timm")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import accuracy  # noqa: E402


def test_sweep_on_a_tiny_setting(tmp_path):
    torch.manual_seed(0)
    data = accuracy.load_digits_split(limit=300)
    assert [len(t) for t in data] == [225, 225, 75, 75] and data[0].shape[1:] == (1, 8, 8)
    model = accuracy.build_vit(embed_dim=32, depth=2, heads=2)
    losses = accuracy.train(model, data[0], data[1], epochs=1, lr=2e-3)
    assert len(losses) == 1
    result = accuracy.sweep(model, data, rs=[0, 4], keeps=[0.5], layers=[1], finetune_epochs=1, eval_batch=64)
    assert set(result) == {"accuracy", "accuracy_finetuned_unpruned", "rows"}
    assert [row["label"] for row in result["rows"]] == ["ToMe r=0", "ToMe r=4", "TopK keep=0.5"]
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["accuracy_finetuned"] <= 1.0
    unpruned, tome, topk = result["rows"]
    assert unpruned["accuracy"] == result["accuracy"]       # r=0 is the unpruned model, exactly
    assert unpruned["flops_speedup"] == 1.0 and unpruned["tokens_out"] == [65, 65]
    assert tome["tokens_out"] == [61, 57] and tome["flops_speedup"] > 1.0
    assert topk["tokens_out"] == [65, 33] and topk["flops_speedup"] > 1.0

    # the figure, from a result with measured speedups filled in as run() does
    for row in result["rows"]:
        row["measured_speedup"] = row["flops_speedup"]
    result.update(batch=64, model={"depth": 2, "embed_dim": 32})
    accuracy.plot(result, str(tmp_path / "figure.png"))
    assert (tmp_path / "figure.png").stat().st_size > 0
