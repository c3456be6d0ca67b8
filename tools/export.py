"""Export a model with token reduction built in to ONNX, or rewrite an existing ONNX export.

    .venv/bin/python tools/export.py --model vit_base_patch16_224 --random-init --policy tome --r 13 \\
        --onnx out/vit.onnx --check --check-trt
    .venv/bin/python tools/export.py --onnx-in model.onnx --policy topk --layers 3 6 9 --keep 0.5 --out pruned.onnx

Run with --help for every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokensparse.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
