"""`tokensparse bench --onnxruntime` under its former name: ONNX Runtime (CPU) on a timm ViT, the unpruned and
the tokensparse exports side by side (`--native` adds rewrite_onnx of the unpruned export).

    .venv/bin/python tools/bench_onnx.py --policy tome --r 13 --batch 8 --runs 20
"""

import sys

from tokensparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--onnxruntime", *sys.argv[1:]]))
