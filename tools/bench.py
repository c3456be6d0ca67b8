"""`tokensparse bench` (the console script) under its former name, for tools/gpu_check.sh and the command lines
in docs/benchmarks.md: eager vs Inductor vs tokensparse on a timm ViT (random init), on the CPU or a GPU.
`tokensparse bench --help` lists every option.

    .venv/bin/python tools/bench.py --policy tome --r 13 --batch 8 --runs 20
    python tools/bench.py --device cuda --dtype bfloat16 --batch 64 --runs 50 --policy tome     # a GPU
"""

import sys

from tokensparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
