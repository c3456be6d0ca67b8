"""`tokensparse bench --onnxruntime`: ONNX Runtime (CPU) on a timm ViT (random init), the unpruned and the
tokensparse exports side by side in one process, medians; ratios against the unpruned model and the FLOPs-ideal
speedup."""

from __future__ import annotations

import json
import os
import tempfile


def run_onnxruntime(args) -> dict:
    """ONNX Runtime (CPU) on the unpruned export, the tokensparse export (to_onnx) and, with --native, the
    ONNX-native rewrite of the unpruned one."""
    import onnxruntime
    import torch
    from rich.console import Console
    from rich.table import Table

    import tokensparse
    from tokensparse.benchmark import time_side_by_side
    from tokensparse.cli.bench import build_model
    from tokensparse.cli.policy_options import policy_from_args
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
