"""`tokensparse explain`: the table for a Hugging Face config directory and the merge picture."""

import pytest
import transformers

from tokensparse.cli import main


@pytest.fixture(scope="module")
def vit_config_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vit_config")
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8).save_pretrained(directory)
    return str(directory)


def test_explain_prints_the_tokens_per_block_and_writes_the_picture(vit_config_dir, tmp_path, capsys):
    png = tmp_path / "merges.png"
    assert main(["explain", "--model", vit_config_dir, "--random-init", "--policy", "tome", "--r", "2",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "'policy': 'tome', 'r': 2" in out and "FLOPs-ideal speedup" in out
    assert png.exists() and f"wrote {png}" in out


def test_a_bad_policy_value_exits_2(vit_config_dir, capsys):
    assert main(["explain", "--model", vit_config_dir, "--random-init", "--policy", "topk", "--keep", "1.5"]) == 2
    assert "keep=1.5 is out of range" in capsys.readouterr().err
