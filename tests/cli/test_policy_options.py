"""The policy options of every subcommand come from the policy dataclasses: every policy and each of its fields
a user sets, with the dataclass defaults; a value given reaches the policy, a bad one is the policy's own error."""

import dataclasses

import pytest

from tokensparse import SnapKV, StreamingLLM, ToMe, TopK
from tokensparse.cli import bench, export, main
from tokensparse.cli.policy_options import policy_fields, policy_from_args, skipped_fields
from tokensparse.policies import POLICIES, FastV


def _parse(*argv):
    return export.parser().parse_args(["--onnx-in", "m.onnx", "--out", "x.onnx", *argv])


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_offered_with_its_dataclass_defaults(name):
    cls = POLICIES[name]
    assert skipped_fields(cls) == []
    assert policy_from_args(_parse("--policy", name)) == cls()
    internal = {field.name for field in dataclasses.fields(cls) if not field.repr}
    assert {field.name for field in policy_fields(cls)} == {field.name for field in dataclasses.fields(cls)} - internal


@pytest.mark.parametrize("argv, want", [
    (["--policy", "snapkv", "--budget", "256"], SnapKV(budget=256)),
    (["--policy", "snapkv", "--budget", "0.5", "--window", "8"], SnapKV(budget=0.5, window=8)),
    (["--policy", "tome", "--r", "4"], ToMe(r=4)),
    (["--policy", "tome", "--r", "4", "3", "--no-proportional-attention"], ToMe(r=(4, 3), proportional_attention=False)),
    (["--policy", "tome", "--schedule", "decreasing", "--prefix-tokens", "0"], ToMe(schedule="decreasing", prefix_tokens=0)),
    (["--policy", "topk", "--layers", "1", "--keep", "1", "--fuse"], TopK(layers=(1,), keep=1.0, fuse=True)),
    (["--policy", "fastv", "--vision-span", "3", "10", "--query", "text"], FastV(vision_span=(3, 10), query="text")),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_given_options_reach_the_policy(argv, want):
    assert policy_from_args(_parse(*argv)) == want


def test_a_float_option_given_as_an_integer_is_a_float():
    assert type(policy_from_args(_parse("--policy", "topk", "--keep", "1")).keep) is float


def test_fields_set_internally_are_not_options():
    assert "rope" not in {field.name for field in policy_fields(StreamingLLM)}
    with pytest.raises(SystemExit):
        _parse("--policy", "streamingllm", "--rope", "1")


def test_a_bad_value_is_the_policys_own_error(capsys):
    assert main(["export", "--onnx-in", "m.onnx", "--out", "x.onnx", "--policy", "snapkv", "--budget", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: budget=0" in err and "Traceback" not in err


def test_a_kv_policy_on_an_onnx_file_names_itself(capsys):
    assert main(["export", "--onnx-in", "m.onnx", "--out", "x.onnx", "--policy", "snapkv", "--budget", "256"]) == 2
    assert "the config has snapkv" in capsys.readouterr().err


def test_options_another_policy_reads_are_named(capsys):
    main(["export", "--onnx-in", "m.onnx", "--out", "x.onnx", "--policy", "tome", "--keep", "0.5", "--sinks", "2"])
    err = capsys.readouterr().err
    assert "warning: --keep is ignored with --policy tome: it is read by --policy topk, --policy fastv and " \
           "--policy divprune" in err
    assert "warning: --sinks is ignored with --policy tome: it is read by --policy streamingllm" in err


def test_bench_offers_the_vision_encoder_policies_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--policy", "fastv"])
    assert exit_info.value.code == 2 and "invalid choice: 'fastv'" in capsys.readouterr().err
    args = bench.parse_args(["--policy", "topk", "--onnxruntime", "--cudagraphs", "--r", "3"])
    err = capsys.readouterr().err
    assert policy_from_args(args) == TopK()
    assert "warning: --cudagraphs is ignored: --onnxruntime times ONNX Runtime" in err
    assert "warning: --r is ignored with --policy topk: it is read by --policy tome" in err


@pytest.mark.parametrize("command", ["export", "explain", "bench"])
def test_policy_is_required_by_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", "vit_tiny_patch16_224"])
    assert exit_info.value.code == 2 and "--policy is required" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune"])
    assert exit_info.value.code == 2 and "invalid choice: 'prune'" in capsys.readouterr().err


def test_console_script_is_registered():
    """pyproject.toml's [project.scripts] names tokensparse.cli:main (installed as .venv/bin/tokensparse)."""
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tokensparse": "tokensparse.cli:main"}
