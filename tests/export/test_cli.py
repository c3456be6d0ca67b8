"""`tokensparse export`: export with --check and --check-trt from a Hugging Face config directory, rewrite an
existing ONNX file, and a clear message with exit status 2 for every bad input."""

import json

import pytest
import transformers

from tokensparse.cli import main as tokensparse_main


def main(argv):
    return tokensparse_main(["export", *argv])


@pytest.fixture(scope="module")
def vit_config_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vit_config")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    config.save_pretrained(directory)
    return str(directory)


def test_export_with_checks(vit_config_dir, tmp_path, capsys):
    out = tmp_path / "vit.onnx"
    status = main(["--model", vit_config_dir, "--random-init", "--policy", "tome", "--r", "2",
                   "--onnx", str(out), "--check", "--check-trt"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert out.exists()
    assert "with tome built in" in err
    assert "ONNX Runtime vs pruned PyTorch" in err and "ok" in err
    assert "TensorRT" in err and "compatible" in err


@pytest.fixture(scope="module")
def plain_onnx(vit_config_dir, tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain") / "plain.onnx"
    assert main(["--model", vit_config_dir, "--random-init", "--policy", "none", "--onnx", str(plain)]) == 0
    return plain


def test_rewrite_existing_onnx(plain_onnx, tmp_path, capsys):
    pruned = tmp_path / "pruned.onnx"
    assert main(["--onnx-in", str(plain_onnx), "--policy", "topk", "--layers", "1", "--keep", "0.5",
                 "--out", str(pruned)]) == 0
    err = capsys.readouterr().err
    assert pruned.exists() and "tokens entering each block: 17 -> 17 -> 9 -> 9" in err
    assert "warning" not in err


def test_rewrite_that_writes_nothing_exits_4_with_the_reason(plain_onnx, tmp_path, capsys):
    assert main(["--onnx-in", str(plain_onnx), "--policy", "tome", "--r", "0", "--out", str(tmp_path / "x.onnx")]) == 4
    assert "not rewritten: nothing to reduce" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_output_linked_to_the_input_is_refused(plain_onnx, tmp_path, capsys):
    link = tmp_path / "link.onnx"
    link.symlink_to(plain_onnx)
    before = plain_onnx.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--onnx-in", str(plain_onnx), "--policy", "tome", "--r", "2", "--out", str(link)])
    assert exit_info.value.code == 2
    assert "is the --onnx-in file (or a link to it)" in capsys.readouterr().err
    assert plain_onnx.read_bytes() == before


def test_language_model_policy_on_an_onnx_file_is_a_clear_error(plain_onnx, tmp_path, capsys):
    assert main(["--onnx-in", str(plain_onnx), "--policy", "fastv", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "rewrites vision transformers with ToMe or TopK; the config has fastv" in err and "Traceback" not in err


def test_options_a_run_does_not_read_are_named(plain_onnx, tmp_path, capsys):
    assert main(["--onnx-in", str(plain_onnx), "--policy", "topk", "--layers", "1", "--r", "4", "--batch", "3",
                 "--out", str(tmp_path / "x.onnx")]) == 0
    err = capsys.readouterr().err
    assert "warning: --r is ignored with --policy topk: it is read by --policy tome" in err
    assert "warning: --batch is ignored with --onnx-in: it applies to exporting a --model" in err


@pytest.mark.parametrize("argv, message", [
    (["--onnx-in", "m.onnx", "--out", "x.onnx"], "--policy is required"),
    (["--onnx-in", "m.onnx", "--model", "vit_tiny_patch16_224", "--policy", "tome", "--out", "x.onnx"], "not both"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--onnx-in", "missing.onnx", "--policy", "tome", "--out", "x.onnx"], "no such ONNX file"),
    (["--onnx-in", "{notes}", "--policy", "tome", "--out", "x.onnx"], "is not an ONNX model"),
    (["--model", "no_such_model_name", "--random-init", "--policy", "tome", "--onnx", "x.onnx"],
     "neither a timm model name"),
    (["--model", "{empty_dir}", "--random-init", "--policy", "tome", "--onnx", "x.onnx"], "without a config.json"),
    (["--model", "{config}", "--random-init", "--policy", "topk", "--keep", "1.5", "--onnx", "x.onnx"],
     "keep=1.5 is out of range"),
    (["--model", "{config}", "--random-init", "--policy", "topk", "--layers", "9", "--onnx", "x.onnx"],
     "block 9 is past the model's depth"),
])
def test_bad_inputs_exit_2_with_a_clear_message(argv, message, vit_config_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    names = {"notes": str(tmp_path / "notes.txt"), "empty_dir": str(tmp_path / "empty"), "config": vit_config_dir}
    argv = [arg.format(**names) for arg in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_missing_output_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "vit_tiny_patch16_224", "--policy", "tome"])
    assert exit_info.value.code == 2
    assert "--onnx PATH is required" in capsys.readouterr().err


def test_config_json_is_read_not_written(vit_config_dir):
    before = open(f"{vit_config_dir}/config.json").read()
    json.loads(before)
    main(["--model", vit_config_dir, "--random-init", "--policy", "none", "--onnx", f"{vit_config_dir}/../m.onnx"])
    assert open(f"{vit_config_dir}/config.json").read() == before


def test_engine_without_tensorrt_stops_after_the_onnx_with_the_gpu_command(vit_config_dir, tmp_path, capsys):
    from tokensparse.deploy.tensorrt import missing_for_tensorrt

    if missing_for_tensorrt() is None:
        pytest.skip("TensorRT and a GPU are present: the engine would be built")
    out = tmp_path / "vit.onnx"
    status = main(["--model", vit_config_dir, "--random-init", "--policy", "tome", "--r", "2", "--onnx", str(out),
                   "--engine", str(tmp_path / "vit.plan"), "--fp16"])
    err = capsys.readouterr().err
    assert status == 3 and out.exists() and not (tmp_path / "vit.plan").exists()
    assert "no TensorRT engine built" in err and "polygraphy convert" in err and "--fp16" in err
    assert "pixel_values:[1,3,32,32]" in err.replace("\n", "")


def test_kernel_plugins_export_checks_through_the_plugin_kernels(vit_config_dir, tmp_path, capsys):
    """--plugins kernel: --check runs the ONNX with each plugin launched as TensorRT would (Triton's interpreter
    here); without TensorRT the engine stops with the command to rerun, and no server repository is written
    (ONNX Runtime cannot run the plugin nodes)."""
    from tokensparse.deploy.tensorrt import missing_for_tensorrt

    if missing_for_tensorrt() is None:
        pytest.skip("TensorRT and a GPU are present: the engine would be built")
    out, repo = tmp_path / "vit.onnx", tmp_path / "models"
    status = main(["--model", vit_config_dir, "--random-init", "--policy", "tome", "--r", "2", "--onnx", str(out),
                   "--plugins", "kernel", "--check", "--engine", str(tmp_path / "vit.plan"),
                   "--triton-repo", str(repo)])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 3 and out.exists() and not repo.exists()
    assert "the ONNX with its plugin kernels launched as TensorRT would (cpu) vs pruned PyTorch" in err and "ok" in err
    assert "run this same command on a machine with TensorRT and a GPU" in err and "--plugins kernel" in err
    assert "no Triton Inference Server repository written" in err


def test_repository_of_a_kernel_plugin_engine_says_it_needs_no_python(tmp_path):
    from tokensparse.deploy.triton_server import check_model_config, write_model_repository

    onnx_path = tmp_path / "vit.onnx"
    result = main(["--model", _vit_dir(tmp_path), "--random-init", "--policy", "tome", "--r", "2",
                   "--onnx", str(onnx_path), "--plugins", "kernel"])
    assert result == 0
    engine = tmp_path / "vit.plan"
    engine.write_bytes(b"stands in for a TensorRT plan")
    config = write_model_repository(str(tmp_path / "models"), "vit", str(onnx_path), str(engine), 8, "kernel")
    assert check_model_config(open(config).read()).platform == "tensorrt_plan"
    readme = (tmp_path / "models" / "README.md").read_text()
    assert "needs no Python and no plugin library" in readme and "standard ONNX operators" not in readme
    with pytest.raises(ValueError, match="ONNX Runtime cannot run"):
        write_model_repository(str(tmp_path / "other"), "vit", str(onnx_path), None, 8, "kernel")
    assert not (tmp_path / "other").exists()


def _vit_dir(tmp_path) -> str:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    config.save_pretrained(tmp_path / "vit_config")
    return str(tmp_path / "vit_config")


def test_triton_repository_parses_as_a_model_config(vit_config_dir, tmp_path, capsys):
    from tokensparse.deploy.triton_server import check_model_config

    out = tmp_path / "vit.onnx"
    repo = tmp_path / "models"
    assert main(["--model", vit_config_dir, "--random-init", "--policy", "tome", "--r", "2", "--onnx", str(out),
                 "--triton-repo", str(repo)]) == 0
    config = check_model_config((repo / "vit" / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert [i.name for i in config.input] == ["pixel_values"] and list(config.input[0].dims) == [3, 32, 32]
    assert list(config.output[0].dims) == [11, 32]         # 17 tokens, 2 merged in each of 3 blocks
    assert (repo / "vit" / "1" / "model.onnx").exists() and (repo / "README.md").exists()


def test_static_export_keeps_the_batch_axis_in_the_server_config(vit_config_dir, tmp_path):
    from tokensparse.deploy.triton_server import check_model_config

    repo = tmp_path / "models"
    assert main(["--model", vit_config_dir, "--random-init", "--policy", "tome", "--r", "2", "--static",
                 "--batch", "3", "--onnx", str(tmp_path / "vit.onnx"), "--triton-repo", str(repo)]) == 0
    config = check_model_config((repo / "vit" / "config.pbtxt").read_text())
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [3, 3, 32, 32]
    assert not config.HasField("dynamic_batching")


@pytest.fixture(scope="module")
def llava_config_dir(tmp_path_factory):
    from tests.models import build_llava

    directory = tmp_path_factory.mktemp("llava_config")
    model, _ = build_llava()
    model.config.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("policy", [["fastv", "--layer", "2", "--keep", "0.25"],
                                    ["visionzip", "--dominant", "5", "--contextual", "2"]], ids=lambda p: p[0])
def test_llava_export_with_checks(policy, llava_config_dir, tmp_path, capsys):
    out = tmp_path / "llava.onnx"
    status = main(["--model", llava_config_dir, "--random-init", "--policy", *policy,
                   "--static", "--onnx", str(out), "--check", "--check-trt"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"with {policy[0]} built in; inputs ['input_ids', 'pixel_values'], outputs ['logits', 'image_hidden_states']" in err
    assert "ONNX Runtime vs the masking oracle" in err and "ok" in err
    assert "compatible" in err


@pytest.mark.parametrize("argv, message", [
    (["--policy", "fastv"], "cannot be exported with a dynamic batch axis: export with dynamic=False (tokensparse export "
                            "--static)"),
    (["--policy", "fastv", "--layer", "9", "--static"], "layer 9 is out of range: fastv needs 1 <= layer < 4"),
    (["--policy", "pyramiddrop", "--ratio", "0", "--static"], "ratio=0.0 is out of range"),
    (["--policy", "visionzip", "--dominant", "15", "--contextual", "2", "--static"],
     "dominant=15, contextual=2 do not fit the encoder's 16 patch tokens"),
])
def test_llava_bad_options_exit_2(argv, message, llava_config_dir, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["--model", llava_config_dir, "--random-init", "--onnx", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_llava_generation_pair_with_checks(llava_config_dir, tmp_path, capsys):
    """prefill.onnx and decode.onnx; --check generates 16 tokens in ONNX Runtime against generate() with the
    masking oracle."""
    out = tmp_path / "pair"
    status = main(["--model", llava_config_dir, "--random-init", "--policy", "fastv", "--layer", "2", "--keep", "0.25",
                   "--static", "--generation", str(out), "--check", "--check-trt"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"wrote {out / 'prefill.onnx'} (with fastv built in) and {out / 'decode.onnx'}" in err
    assert "decoder layers by cache length: [[0, 1], [2, 3]]" in err
    assert "ONNX Runtime vs generate() with the masking oracle" in err and "ok" in err
    assert err.count("compatible") == 2


def test_generation_pair_of_a_vision_transformer_is_a_clear_error(vit_config_dir, tmp_path, capsys):
    assert main(["--model", vit_config_dir, "--random-init", "--policy", "tome", "--generation",
                 str(tmp_path / "pair")]) == 2
    assert "--generation exports a generative model's prefill and decode step" in capsys.readouterr().err
