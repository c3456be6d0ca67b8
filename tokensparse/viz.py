"""Pictures for explain(): which patches each token holds after every block (matplotlib)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from tokensparse.policies.base import recorder


def token_groups(entries, prefix: int, patches: int) -> list[list[set]]:
    """Replay recorded steps (sample 0): after each step, the list of tokens as sets of patch ids."""
    tokens = [set() for _ in range(prefix)] + [{i} for i in range(patches)]
    history = []
    for entry in entries:
        kind, protected = entry[0], entry[1]
        head, rest = tokens[:protected], tokens[protected:]
        if kind == "tome":
            src, dst, unm = (t[0, :, 0].tolist() for t in entry[2:5])
            a, b = rest[0::2], [set(group) for group in rest[1::2]]
            for s, d in zip(src, dst):
                b[d] |= a[s]
            tokens = head + [a[u] for u in unm] + b
        else:
            kept = entry[2][0].tolist()
            tokens = head + [rest[i] for i in kept]
            if entry[3]:
                dropped = set().union(*rest) - set().union(*(rest[i] for i in kept))
                tokens.append(dropped)
        history.append(tokens)
    return history


def draw_token_groups(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = report._result
    rows, cols = report.grid
    with torch.no_grad(), recorder.recording() as entries:
        result.gm(*report._inputs)
    history = token_groups(entries, report.prefix_tokens, rows * cols)
    acted = [row for row in report.blocks if row.acted]
    panels = len(history)
    ncols = min(panels, 4)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False)
    palette = np.random.default_rng(0).uniform(0.15, 1.0, size=(rows * cols, 3))
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, tokens in zip(axes.flat, acted, history):
        image = np.zeros((rows * cols, 3))
        for group in tokens:
            for patch in group:  # a token takes the colour of its first patch, so merges read across panels
                image[patch] = palette[min(group)]
        ax.imshow(image.reshape(rows, cols, 3), interpolation="nearest")
        ax.set_title(f"{row.path}: {row.tokens_out} tokens", fontsize=9)
    fig.suptitle(f"{report.options['policy']}: patches per token (black: dropped)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
