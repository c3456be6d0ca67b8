"""`tokensparse explain` (the console script) under its former name: the explain table for a model, optionally
the merge picture. `tokensparse explain --help` lists every option.

    .venv/bin/python tools/explain.py --model vit_base_patch16_224 --random-init --policy tome --r 13 \\
        --png out/merges.png
"""

import sys

from tokensparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
