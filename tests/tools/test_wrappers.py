"""tools/export.py, explain.py, bench.py and bench_onnx.py are the `tokensparse` subcommands under their former
names, run from anywhere (the package is installed; no tool patches sys.path except to import tests.models)."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
NEEDS_TESTS_MODELS = {"bench_kv.py", "bench_video.py", "bench_vlm.py", "onnx_sweep.py"}


@pytest.mark.parametrize("tool, usage", [("export.py", "tokensparse export"), ("explain.py", "tokensparse explain"),
                                         ("bench.py", "tokensparse bench"), ("bench_onnx.py", "tokensparse bench")])
def test_wrapper_is_the_subcommand(tool, usage, tmp_path):
    done = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {usage}") and "--policy" in done.stdout


def test_tools_do_not_patch_sys_path():
    patching = {path.name for path in TOOLS.glob("*.py") if "sys.path.insert" in path.read_text()}
    assert patching <= NEEDS_TESTS_MODELS
    for name in patching:
        assert "from tests.models import" in (TOOLS / name).read_text()
