"""Benchmark: ONNX Runtime (CPU) on timm ViT-B/16 (random init), unpruned vs tokensparse exports, side by
side in one process, medians; ratios against the unpruned model and the FLOPs-ideal speedup.

    .venv/bin/python tools/bench_onnx.py --policy tome --r 13 --batch 8 --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_model, policy_from_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--policy", default="tome", choices=["tome", "topk"])
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--native", action="store_true", help="also time the ONNX-native rewrite of the plain export")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def run(args) -> dict:
    import onnxruntime
    from rich.console import Console
    from rich.table import Table

    import tokensparse
    from tokensparse.benchmark import time_side_by_side
    from tokensparse.export import rewrite_onnx, to_onnx

    console = Console()
    model = build_model(args.model)
    image = model.default_cfg.get("input_size", (3, 224, 224))
    pixels = torch.randn(args.batch, *image, generator=torch.Generator().manual_seed(0))
    policy = policy_from_args(args)
    report = tokensparse.explain(model, pixels, config=tokensparse.Config(vision=policy))
    directory = tempfile.mkdtemp(prefix="tokensparse-onnx-")
    console.print(f"exporting to {directory} ...")
    paths = {"onnxruntime unpruned": to_onnx(model, (pixels,), None, os.path.join(directory, "plain.onnx")).path,
             f"onnxruntime {policy.name} (to_onnx)": to_onnx(model, (pixels,), tokensparse.Config(vision=policy),
                                                            os.path.join(directory, "pruned.onnx")).path}
    if args.native:
        native = rewrite_onnx(paths["onnxruntime unpruned"], os.path.join(directory, "native.onnx"),
                              tokensparse.Config(vision=policy))
        paths[f"onnxruntime {policy.name} (rewrite_onnx)"] = native.written
    options = onnxruntime.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    feeds = pixels.numpy()
    variants = {}
    for name, path in paths.items():
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        variants[name] = ((lambda s, n: (lambda x: s.run(None, {n: x})))(session, input_name), 0.0)
    timings = time_side_by_side(variants, (feeds,), args.runs)
    base = timings["onnxruntime unpruned"].median_ms
    ideal = report.flops_ideal_ratio
    table = Table(title=f"{args.model} batch {args.batch}, ONNX Runtime CPU, median of {args.runs} runs")
    for column in ("variant", "median ms", "speedup", "of FLOPs-ideal"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows = {}
    for name, timing in timings.items():
        speedup = base / timing.median_ms
        share = speedup / ideal if name != "onnxruntime unpruned" else None
        rows[name] = {"median_ms": timing.median_ms, "speedup": speedup, "of_ideal": share}
        table.add_row(name, f"{timing.median_ms:.1f}", f"{speedup:.2f}x", f"{share:.2f}" if share else "")
    console.print(table)
    console.print(f"FLOPs-ideal speedup {ideal:.2f}x")
    result = {"model": args.model, "batch": args.batch, "runs": args.runs, "policy": policy.options(),
              "flops_ideal_speedup": ideal, "variants": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return result


if __name__ == "__main__":
    run(parse_args())
