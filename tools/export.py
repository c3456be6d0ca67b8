"""`tokensparse export` (the console script) under its former name: export a model with token reduction built
in to ONNX, or rewrite an existing ONNX export. `tokensparse export --help` lists every option.

    .venv/bin/python tools/export.py --model vit_base_patch16_224 --random-init --policy tome --r 13 \\
        --onnx out/vit.onnx --check --check-trt
"""

import sys

from tokensparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
