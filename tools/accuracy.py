"""Accuracy against speedup: a small ViT trained on scikit-learn's handwritten digits (8x8, one token per pixel,
no download), then ToMe r and TopK keep applied off the shelf and after a short fine-tune with the policy on (the
tokensparse-compiled model trained under autograd), as the ToMe paper's trade-off figure.

    .venv/bin/python tools/accuracy.py    # 30 min on the shared 2-core machine: benchmarks/cpu/digits_accuracy.json and
                                          # docs/digits_accuracy.png (--replot: redraw it from the JSON)
    .venv/bin/python tools/accuracy.py --epochs 5 --finetune-epochs 1 --runs 5 --json /tmp/a.json --png /tmp/a.png

Accuracy is computed with each policy's rewritten graph run eagerly (inductor=False: the same graph Inductor
compiles, without its compile time). Measured speedup: the pruned model compiled by Inductor against the unpruned
one compiled by Inductor, medians of interleaved runs in one process (tokensparse.benchmark.time_side_by_side).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the unpruned model")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8], help="ToMe: tokens merged per block")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5, 0.3], help="TopK: fraction kept")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3], help="TopK: blocks that prune")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tune epochs with the policy on")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=256, help="batch of the timed runs")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per variant (medians)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/cpu/digits_accuracy.json"))
    parser.add_argument("--png", default=str(ROOT / "docs/digits_accuracy.png"))
    parser.add_argument("--replot", action="store_true", help="only redraw --png from the figures in --json")
    return parser.parse_args(argv)


def load_digits_split(limit: int | None = None, test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 1797 digits as [N, 1, 8, 8] floats in [0, 1] and labels; a stratified seeded split.
    `limit` keeps the first `limit` images (for quick checks)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images[:limit], digits.target[:limit]
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                                                        stratify=labels)
    def as_images(a):
        return torch.tensor(a, dtype=torch.float32)[:, None] / 16.0
    return as_images(x_train), torch.tensor(y_train), as_images(x_test), torch.tensor(y_test)


def build_vit(embed_dim: int = 64, depth: int = 6, heads: int = 4, seed: int = 0):
    """A timm VisionTransformer for 8x8 one-channel images: patch size 1, so 64 tokens + CLS."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=8, patch_size=1, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=depth,
                              num_heads=heads, mlp_ratio=2.0)
    # One pixel per token: where a token sits is known only from its position embedding, which timm draws with
    # std 0.02, small beside a pixel's embedding; with std 0.5 training leaves chance level within 3 epochs.
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    return model


def make_policy(kind: str, value, layers=(1, 3)):
    from tokensparse import ToMe, TopK

    return ToMe(r=value) if kind == "tome" else TopK(layers=tuple(layers), keep=value)


def with_policy(model, policy, inductor: bool = False):
    """`model` compiled by tokensparse with `policy`; inductor=False runs the rewritten graph eagerly."""
    import tokensparse

    return tokensparse.compile(model, tokensparse.Config(vision=policy, inductor=inductor))


def train(model, x, y, epochs: int, lr: float, batch: int = 64, seed: int = 0, forward=None, progress=None):
    """AdamW with a cosine schedule over `epochs`; `forward` (default: the model) is what is trained through, e.g.
    the tokensparse-compiled model. Returns the mean loss of each epoch."""
    forward = forward if forward is not None else model
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            # Drop a last batch shorter than the others: one batch size, one compiled graph.
            if len(index) < batch and start > 0:
                continue
            loss = torch.nn.functional.cross_entropy(forward(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        losses.append(total / len(x))
        if progress is not None:
            progress()
    model.eval()
    return losses


def accuracy(forward, x, y, batch: int = 256) -> float:
    """Top-1 accuracy of `forward` on (x, y), in batches of `batch` (the last one padded with zeros: one shape)."""
    padded = -(-len(x) // batch) * batch
    x = torch.cat([x, x.new_zeros(padded - len(x), *x.shape[1:])])
    with torch.inference_mode():
        logits = torch.cat([forward(x[start:start + batch]) for start in range(0, padded, batch)])[:len(y)]
    return (logits.argmax(1) == y).float().mean().item()


def variants(rs, keeps):
    return [("tome", r) for r in rs] + [("topk", keep) for keep in keeps]


def label(kind: str, value) -> str:
    return f"ToMe r={value}" if kind == "tome" else f"TopK keep={value}"


def sweep(model, data, rs, keeps, layers=(1, 3), finetune_epochs: int = 0, finetune_lr: float = 5e-4,
          eval_batch: int = 256, seed: int = 0, progress=None) -> dict:
    """Accuracy and FLOPs-ideal speedup of each policy on the trained `model`, off the shelf and (finetune_epochs > 0)
    after fine-tuning a copy through the tokensparse-compiled model. `data`: load_digits_split()'s four tensors.
    Fine-tuned accuracies come with a control: the unpruned model fine-tuned as long."""
    import tokensparse

    x_train, y_train, x_test, y_test = data
    model.eval()
    base = accuracy(model, x_test, y_test, eval_batch)
    result = {"accuracy": base, "rows": []}
    if finetune_epochs:
        control = copy.deepcopy(model)
        train(control, x_train, y_train, finetune_epochs, finetune_lr, seed=seed + 1)
        result["accuracy_finetuned_unpruned"] = accuracy(control, x_test, y_test, eval_batch)
    for kind, value in variants(rs, keeps):
        policy = make_policy(kind, value, layers)
        report = tokensparse.explain(model, x_test[:eval_batch], config=tokensparse.Config(vision=policy))
        row = {"policy": kind, "r" if kind == "tome" else "keep": value, "label": label(kind, value),
               "tokens_out": [block.tokens_out for block in report.blocks],
               "flops_speedup": report.flops_ideal_ratio,
               "accuracy": accuracy(with_policy(model, policy), x_test, y_test, eval_batch)}
        if finetune_epochs:
            tuned = copy.deepcopy(model)
            train(tuned, x_train, y_train, finetune_epochs, finetune_lr, seed=seed + 1,
                  forward=with_policy(tuned, policy))
            row["accuracy_finetuned"] = accuracy(with_policy(tuned, policy), x_test, y_test, eval_batch)
        if kind == "topk":
            row["layers"] = list(layers)
        result["rows"].append(row)
        if progress is not None:
            progress()
    return result


def measure(model, policies: list, x, runs: int, progress=None) -> dict:
    """Median ms of the unpruned model compiled by Inductor and of each (name, policy) compiled by tokensparse
    (Inductor), interleaved in one process; speedups against the unpruned."""
    from tokensparse.benchmark import first_call_seconds, time_side_by_side

    warm_up_inductor()
    model.eval()
    inductor = torch.compile(model)
    timed = {"inductor": (inductor, first_call_seconds(inductor, x))}
    for name, policy in policies:
        compiled = with_policy(model, policy, inductor=True)
        timed[name] = (compiled, first_call_seconds(compiled, x))
        if progress is not None:
            progress()
    timings = time_side_by_side(timed, (x,), runs, progress=progress)
    base = timings["inductor"].median_ms
    return {name: {"median_ms": t.median_ms, "speedup": base / t.median_ms, "compile_s": t.compile_s}
            for name, t in timings.items()}


def warm_up_inductor() -> None:
    from tokensparse.cli.bench import warm_up_inductor as warm

    warm()


def plot(result: dict, path: str) -> None:
    """Two panels as the ToMe paper's trade-off figure: accuracy against FLOPs-ideal and measured speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, title in ((axes[0], "flops_speedup", "FLOPs-ideal speedup"),
                             (axes[1], "measured_speedup", f"measured speedup (Inductor, CPU, batch {result['batch']})")):
        axis.axhline(100 * result["accuracy"], color="gray", lw=0.8, ls=":", label="unpruned")
        for kind, color, marker in (("tome", "tab:blue", "o"), ("topk", "tab:orange", "s")):
            rows = [row for row in result["rows"] if row["policy"] == kind and row.get(key) is not None]
            if not rows:
                continue
            speed = [1.0] + [row[key] for row in rows]
            name = "ToMe" if kind == "tome" else "TopK"
            axis.plot(speed, [100 * result["accuracy"]] + [100 * row["accuracy"] for row in rows],
                      color=color, marker=marker, label=f"{name} off the shelf")
            if all("accuracy_finetuned" in row for row in rows):
                tuned = result.get("accuracy_finetuned_unpruned", result["accuracy"])
                axis.plot(speed, [100 * tuned] + [100 * row["accuracy_finetuned"] for row in rows],
                          color=color, marker=marker, ls="--", mfc="white", label=f"{name} fine-tuned")
            for row in rows:
                axis.annotate(f"r={row['r']}" if kind == "tome" else f"keep {row['keep']}",
                              (row[key], 100 * row["accuracy"]), textcoords="offset points", xytext=(-16, -12),
                              fontsize=7, color=color)
        axis.margins(x=0.08, y=0.08)
        axis.set_xlabel(title)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"ViT ({result['model']['depth']} blocks, dim {result['model']['embed_dim']}) on sklearn digits, "
                    f"64 tokens + CLS", fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from tokensparse.benchmark import device_description

    torch.set_num_threads(args.threads)
    console = Console()
    data = load_digits_split(seed=args.seed)
    model = build_vit(args.embed_dim, args.depth, args.heads, args.seed)
    pairs = variants(args.r, args.keep)
    with Progress(console=console) as progress:
        task = progress.add_task(f"training ({args.epochs} epochs)", total=args.epochs)
        losses = train(model, data[0], data[1], args.epochs, args.lr, seed=args.seed,
                       progress=lambda: progress.advance(task))
        task = progress.add_task(f"policies, fine-tunes ({args.finetune_epochs} epochs)", total=len(pairs))
        result = sweep(model, data, args.r, args.keep, args.layers, args.finetune_epochs, args.finetune_lr,
                       seed=args.seed, progress=lambda: progress.advance(task))
        x = data[2].repeat(-(-args.batch // len(data[2])), 1, 1, 1)[:args.batch]
        task = progress.add_task("compiling, timing", total=len(pairs) + args.runs)
        timings = measure(model, [(label(kind, value), make_policy(kind, value, args.layers)) for kind, value in pairs],
                          x, args.runs, progress=lambda: progress.advance(task))
    for row in result["rows"]:
        row.update(median_ms=timings[row["label"]]["median_ms"], measured_speedup=timings[row["label"]]["speedup"],
                   compile_s=timings[row["label"]]["compile_s"])
    result = {"model": {"embed_dim": args.embed_dim, "depth": args.depth, "heads": args.heads, "mlp_ratio": 2.0,
                        "img_size": 8, "patch_size": 1, "tokens": 65,
                        "parameters": sum(p.numel() for p in model.parameters())},
              "data": {"train": len(data[0]), "test": len(data[2]), "split_seed": args.seed},
              "training": {"epochs": args.epochs, "lr": args.lr, "final_loss": losses[-1],
                           "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr},
              "batch": args.batch, "runs": args.runs, "threads": torch.get_num_threads(),
              "device": device_description("cpu"), "torch": torch.__version__,
              "inductor_median_ms": timings["inductor"]["median_ms"], **result}
    table = Table(title=f"digits, {result['data']['test']} test images; timing batch {args.batch}, "
                        f"{result['device']}, median of {args.runs} runs")
    for column in ("variant", "accuracy", "fine-tuned", "FLOPs-ideal", "measured", "median ms"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    tuned = result.get("accuracy_finetuned_unpruned")
    table.add_row("unpruned", f"{100 * result['accuracy']:.1f}", f"{100 * tuned:.1f}" if tuned else "", "1.00x",
                  "1.00x", f"{result['inductor_median_ms']:.1f}")
    for row in result["rows"]:
        table.add_row(row["label"], f"{100 * row['accuracy']:.1f}",
                      f"{100 * row['accuracy_finetuned']:.1f}" if "accuracy_finetuned" in row else "",
                      f"{row['flops_speedup']:.2f}x", f"{row['measured_speedup']:.2f}x", f"{row['median_ms']:.1f}")
    console.print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.png)
    console.print(f"wrote {args.json} and {args.png}")
    return result


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.replot:
        plot(json.loads(Path(arguments.json).read_text()), arguments.png)
    else:
        run(arguments)
