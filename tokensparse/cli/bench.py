"""`tokensparse bench`: a timm ViT (random init) unpruned and pruned, side by side in one process, medians:
eager vs Inductor vs tokensparse on the CPU or a GPU, or with --onnxruntime the unpruned and pruned ONNX exports
in ONNX Runtime (CPU). Speedups against the unpruned model and the FLOPs-ideal speedup."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from tokensparse.cli.errors import UserError
from tokensparse.cli.policy_options import (add_policy_options, ignored_policy_options, policies_for,
                                            policy_from_args, required_message)

EXAMPLES = """examples:
  tokensparse bench --policy tome --r 13 --batch 8 --runs 20
  tokensparse bench --policy topk --layers 3 6 9 --keep 0.5 --json out/topk.json --png out/topk.png
  tokensparse bench --device cuda --dtype bfloat16 --batch 64 --runs 50 --policy tome --cudagraphs     # a GPU
  tokensparse bench --onnxruntime --native --policy tome --r 13 --batch 8 --runs 20

exit status: 0 done, 2 bad input
"""

# Options of the PyTorch benchmark that the ONNX Runtime one does not read, and the other way round.
TORCH_ONLY = ("device", "dtype", "cudagraphs", "profile", "triton_kernels", "png", "skip_eager", "whole_graph")
ONNXRUNTIME_ONLY = ("native",)


def parser(prog: str = "tokensparse bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm model name (random init)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per variant (medians reported)")
    add_policy_options(parser, policies_for(("vision",)))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores); with --onnxruntime its intra-op threads")
    parser.add_argument("--json", default=None, help="write the results here")
    torch_group = parser.add_argument_group("PyTorch (the default)")
    torch_group.add_argument("--device", default="cpu", help="cpu or cuda")
    torch_group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    torch_group.add_argument("--cudagraphs", action="store_true",
                             help="also time both compiled with CUDA graphs (mode='reduce-overhead'; cudagraphs=True)")
    torch_group.add_argument("--profile", default=None,
                             help="write torch.profiler's table of the tokensparse variant's ops (10 calls) to this "
                                  "file")
    torch_group.add_argument("--triton-kernels", action="store_true",
                             help="on cuda: tokensparse's Triton kernels implement its ops (TOKENSPARSE_TRITON_KERNELS=1)")
    torch_group.add_argument("--png", default=None, help="write explain()'s merge picture here")
    torch_group.add_argument("--skip-eager", action="store_true", help="leave out the unmodified eager model")
    torch_group.add_argument("--whole-graph", action="store_true",
                             help="also time tokensparse compiled as one graph (regional=False), compiled last")
    onnx_group = parser.add_argument_group("ONNX Runtime")
    onnx_group.add_argument("--onnxruntime", action="store_true",
                            help="time the unpruned and the tokensparse ONNX exports in ONNX Runtime (CPU)")
    onnx_group.add_argument("--native", action="store_true",
                            help="also time the ONNX-native rewrite of the unpruned export (rewrite_onnx)")
    return parser


def parse_args(argv=None, prog: str = "tokensparse bench") -> argparse.Namespace:
    command = parser(prog)
    args = command.parse_args(argv)
    if args.policy is None:
        command.error(required_message(policies_for(("vision",))))
    for warning in ignored_options(args, argv):
        print(f"warning: {warning}", file=sys.stderr)
    return args


def ignored_options(args: argparse.Namespace, argv=None) -> list:
    """What the command line gives that this run does not read, each with the reason."""
    explicit, unset = parser(), object()
    explicit.set_defaults(**{name: unset for name in vars(args)})
    given = {name for name, value in vars(explicit.parse_args(argv)).items() if value is not unset}
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    unread, why = (TORCH_ONLY, "--onnxruntime times ONNX Runtime") if args.onnxruntime else \
        (ONNXRUNTIME_ONLY, "it applies to --onnxruntime")
    return ignored_policy_options(args, policies_for(("vision",))) + \
        [f"{flag(name)} is ignored: {why}" for name in unread if name in given]


def main(argv=None, prog: str = "tokensparse bench") -> int:
    args = parse_args(argv, prog)
    try:
        run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args) -> dict:
    """The benchmark's results (also written to --json)."""
    if args.batch < 1 or args.runs < 1:
        raise UserError(f"--batch {args.batch} --runs {args.runs}: both must be at least 1")
    if args.onnxruntime:
        from tokensparse.cli.bench_onnx import run_onnxruntime

        return run_onnxruntime(args)
    # Compile times from cold caches: a fresh cache directory (precompiled headers still work, as for users).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tokensparse-bench-"))
    return run_torch(args)


def build_model(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def warm_up_inductor(device: str = "cpu") -> None:
    """Compile one small unrelated function, so that start-up (compiler checks, headers) is paid."""
    import torch

    with torch.inference_mode():
        torch.compile(lambda a: (a * 2).relu().sum(1) + a.mean())(torch.randn(64, 32, device=device))


def run_torch(args) -> dict:
    import torch

    import tokensparse
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table
    from tokensparse.benchmark import (device_description, eager_ops_per_forward, first_call_seconds, synchronizer,
                                       time_side_by_side)
    from tokensparse.reference import reference_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.triton_kernels:
        import tokensparse.runtime.triton_ops  # noqa: F401  (registers the CUDA implementations)
    console = Console()
    dtype = getattr(torch, args.dtype)
    synchronize = synchronizer(args.device)
    model = build_model(args.model).to(args.device, dtype)
    image = model.default_cfg.get("input_size", (3, 224, 224))
    pixels = torch.randn(args.batch, *image, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    policy = policy_from_args(args)
    options = {key: value for key, value in policy.options().items() if value is not None}

    report = tokensparse.explain(model, pixels, config=tokensparse.Config(vision=policy))
    print(report)
    if args.png:
        report.save_png(args.png)
        console.print(f"merge picture: {args.png}")

    console.print("warming Inductor up (its one-time start-up cost is charged to neither variant) ...")
    warm_up_inductor(args.device)
    console.print("compiling plain Inductor ...")
    torch._dynamo.reset()
    inductor = torch.compile(model)
    inductor_s = first_call_seconds(inductor, pixels, synchronize=synchronize)
    torch._dynamo.reset()
    console.print(f"compiling tokensparse {options} ...")
    pruned = torch.compile(model, backend="tokensparse", options=options)
    pruned_s = first_call_seconds(pruned, pixels, synchronize=synchronize)
    variants = {"inductor": (inductor, inductor_s), f"tokensparse {policy.name}": (pruned, pruned_s),
                f"eager {policy.name} (reference)": (lambda x: reference_forward(model, x, policy), 0.0)}
    if args.whole_graph:
        torch._dynamo.reset()
        console.print("compiling tokensparse as one graph (regional=False) ...")
        whole = torch.compile(model, backend="tokensparse", options={**options, "regional": False})
        variants[f"tokensparse {policy.name} whole graph"] = (whole, first_call_seconds(whole, pixels, synchronize=synchronize))
    if args.cudagraphs:
        torch._dynamo.reset()
        console.print("compiling Inductor and tokensparse with CUDA graphs ...")
        graphed = torch.compile(model, mode="reduce-overhead")
        variants["inductor cudagraphs"] = (graphed, first_call_seconds(graphed, pixels, synchronize=synchronize))
        graphed_pruned = torch.compile(model, backend="tokensparse", options={**options, "cudagraphs": True})
        variants[f"tokensparse {policy.name} cudagraphs"] = (
            graphed_pruned, first_call_seconds(graphed_pruned, pixels, synchronize=synchronize))
    if not args.skip_eager:
        variants = {"eager": (model, 0.0), **variants}

    with torch.inference_mode():
        want = reference_forward(model, pixels, policy)["logits"]
        got = pruned(pixels)
    max_error = (got - want).abs().max().item()

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing", total=args.runs)
        timings = time_side_by_side(variants, (pixels,), args.runs, progress=lambda: progress.advance(task),
                                    synchronize=synchronize)

    base = timings["inductor"].median_ms
    if args.cudagraphs:
        graphed_base = timings["inductor cudagraphs"].median_ms
    ideal = report.flops_ideal_ratio
    where = device_description(args.device)
    table = Table(title=f"{args.model} batch {args.batch}, {args.dtype}, {where}, median of {args.runs} runs")
    # Ops dispatched one by one per forward (views and allocations aside): the host work a GPU would wait on.
    ops = {name: eager_ops_per_forward(fn, pixels) for name, (fn, _) in variants.items()
           if name.startswith(("inductor", "tokensparse"))}
    for column in ("variant", "median ms", "speedup vs inductor (alike)", "of FLOPs-ideal", "compile s",
                   "eager ops/forward"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows = {}
    for name, timing in timings.items():
        speedup = (graphed_base if name.endswith("cudagraphs") else base) / timing.median_ms
        share = speedup / ideal if name.startswith("tokensparse") else None
        rows[name] = {"median_ms": timing.median_ms, "speedup_vs_inductor": speedup, "of_ideal": share,
                      "compile_s": timing.compile_s, "eager_ops_per_forward": ops.get(name)}
        table.add_row(name, f"{timing.median_ms:.1f}", f"{speedup:.2f}x", f"{share:.2f}" if share else "",
                      f"{timing.compile_s:.1f}" if timing.compile_s else "",
                      f"{ops[name]:.0f}" if name in ops else "")
    console.print(table)
    result = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "runs": args.runs,
              "device": where, "dtype": args.dtype, "triton_kernels": args.triton_kernels,
              "options": options, "flops_before": report.flops_before, "flops_after": report.flops_after,
              "flops_ideal_speedup": ideal, "compile_ratio": pruned_s / inductor_s,
              "max_abs_error_vs_reference": max_error, "variants": rows}
    console.print(f"FLOPs-ideal speedup {ideal:.2f}x; tokensparse compile {pruned_s:.1f} s vs Inductor "
                  f"{inductor_s:.1f} s ({pruned_s / inductor_s:.2f}x); max |error| vs eager reference {max_error:.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    if args.profile:
        write_profile(args.profile, pruned, pixels, synchronize)
        console.print(f"profile of tokensparse {policy.name}: {args.profile}")
    return result


def write_profile(path: str, fn, pixels, synchronize) -> None:
    """torch.profiler over 10 calls of fn: ops by self device time (CPU time on a CPU), then by CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pixels.is_cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(10):
            fn(pixels)
        synchronize()
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if pixels.is_cuda else "self_cpu_time_total"
    with open(path, "w") as handle:
        handle.write(averages.table(sort_by=device_key, row_limit=30, max_name_column_width=90))
        handle.write("\n")
        handle.write(averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=90))
