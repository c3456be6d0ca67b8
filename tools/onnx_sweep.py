"""Check both ONNX paths on every model family of tests/models.py against the eager reference: to_onnx,
and rewrite_onnx of a plain torch.onnx export, with ToMe and TopK (fuse), run in ONNX Runtime at batch 3.

    .venv/bin/python tools/onnx_sweep.py
"""

import os
import sys
import tempfile
from pathlib import Path

# tests.models (models built from configs) is not part of the installed package: import it from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from tests.models import VISION_FAMILIES, build  # noqa: E402
from tokensparse import Config, ToMe, TopK  # noqa: E402
from tokensparse.export import rewrite_onnx, to_onnx  # noqa: E402
from tokensparse.reference import reference_forward  # noqa: E402

POLICIES = {"tome r=3": ToMe(r=3), "topk layer 1 keep 0.5 fuse": TopK(layers=(1,), keep=0.5, fuse=True)}


def _run(path, pixels):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]


def _error(got, want):
    return f"{np.abs(got - want).max():.1e}" if got.shape == want.shape else f"shape {got.shape} != {want.shape}"


def main() -> int:
    directory = tempfile.mkdtemp(prefix="tokensparse-sweep-")
    failures = 0
    for family in VISION_FAMILIES:
        for name, policy in POLICIES.items():
            model, pixels = build(family, depth=3, width=32, heads=2, batch=2)
            exported = to_onnx(model, (pixels,), Config(vision=policy), os.path.join(directory, "pruned.onnx"))
            plain = os.path.join(directory, "plain.onnx")
            torch.onnx.export(model, (pixels,), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},)).save(plain)
            native = rewrite_onnx(plain, os.path.join(directory, "native.onnx"), Config(vision=policy))
            test = torch.randn(3, *pixels.shape[1:], generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = reference_forward(model, test, policy)
            want = (want["logits"] if "logits" in want else want["last_hidden_state"]).numpy()
            row = f"{family:20s} {name:27s} to_onnx {_error(_run(exported.path, test), want):>8s}"
            row += f"  rewrite_onnx {_error(_run(native.written, test), want) if native.changed else native.reason}"
            failures += not (exported.changed and native.changed)
            print(row, flush=True)
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
