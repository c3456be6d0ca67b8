"""The README's demo: timm ViT-B/16 built from its config (random weights, no download), batch 8 on the
CPU: eager vs Inductor vs tokensparse ToMe r=13, a speedup table, and the merge picture."""

import sys
from pathlib import Path

from tokensparse.cli import main

if __name__ == "__main__":
    Path("out").mkdir(exist_ok=True)
    sys.exit(main(["bench", "--policy", "tome", "--r", "13", "--batch", "8", "--runs", "10",
                   "--png", "out/tome_merges.png", "--json", "out/demo.json", *sys.argv[1:]]))
