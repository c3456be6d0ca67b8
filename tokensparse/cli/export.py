"""`tokensparse export`: a model and a policy in, a pruned ONNX file out, checked against PyTorch with ONNX
Runtime and against TensorRT's ONNX operator support on request; or an existing ONNX file rewritten."""

from __future__ import annotations

import argparse
import sys

from tokensparse.cli import export_checks as checks, export_deploy as deploy
from tokensparse.cli.errors import UserError
from tokensparse.cli.policy_options import (add_policy_options, config_from_policy, ignored_policy_options,
                                            policies_for, policy_from_args, required_message)

EXAMPLES = """examples:
  tokensparse export --model vit_base_patch16_224 --random-init --policy tome --r 13 --onnx out/vit.onnx --check
  tokensparse export --model path/to/hf_config_dir --random-init --policy topk --layers 3 6 9 --keep 0.5 \\
      --onnx out/clip.onnx --check-trt
  tokensparse export --onnx-in model.onnx --policy tome --r 8 --out pruned.onnx
  tokensparse export --model path/to/llava_config_dir --random-init --policy fastv --keep 0.25 --static \\
      --generation out/llava_fastv --check      # prefill.onnx + decode.onnx, the KV cache in and out
  tokensparse export --model path/to/llava_config_dir --random-init --policy snapkv --budget 16 --static \\
      --generation out/llava_snapkv --check
  tokensparse export --model vit_base_patch16_224 --random-init --policy tome --onnx out/vit.onnx \\
      --engine out/vit.plan --fp16 --compare --triton-repo out/models      # experimental: tokensparse.deploy

exit status: 0 done, 1 a check failed, 2 bad input, 3 no TensorRT engine could be built (no GPU or no TensorRT on the machine),
             4 the ONNX model did not match the rewrite (--onnx-in): nothing written
"""

EXPORT_ONLY = ("random_init", "checkpoint", "onnx", "generation", "opset", "batch", "static", "plugins", "check",
               "engine", "fp16", "bf16", "compare", "max_batch", "triton_repo")
REWRITE_ONLY = ("out", "explain")
NOTHING_WRITTEN = 4


def parser(prog: str = "tokensparse export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--model", help="a timm model name, or a Hugging Face config/checkpoint directory")
    source.add_argument("--random-init", action="store_true", help="random seeded weights (no download)")
    source.add_argument("--checkpoint", help="a state_dict file for a timm model")
    source.add_argument("--onnx-in", help="rewrite this existing ONNX model instead of exporting one")
    add_policy_options(parser, policies_for(), allow_none=True)
    output = parser.add_argument_group("output")
    output.add_argument("--onnx", help="where to write the exported ONNX model")
    output.add_argument("--out", help="with --onnx-in: where to write the rewritten model")
    output.add_argument("--generation", metavar="DIR",
                        help="a generative model (LLaVA): write DIR/prefill.onnx and DIR/decode.onnx, which take "
                             "and give the (pruned) KV cache, for generation in ONNX Runtime or a C++ loop")
    output.add_argument("--opset", type=int, default=18)
    output.add_argument("--batch", type=int, default=2, help="batch of the example input")
    output.add_argument("--static", action="store_true", help="fixed batch axis (default: dynamic)")
    output.add_argument("--plugins", nargs="?", const="step", choices=("step", "kernel"),
                        help="write TensorRT plugin nodes instead of standard ONNX ops: 'step' (the default) one per "
                             "policy step, run from Python; 'kernel' one per Triton kernel, compiled ahead of time "
                             "into the engine, which then runs from C++")
    output.add_argument("--check", action="store_true", help="compare ONNX Runtime with the pruned PyTorch model")
    output.add_argument("--check-trt", action="store_true", help="check the ONNX against TensorRT's op support")
    output.add_argument("--explain", action="store_true", help="with --onnx-in: say what matched and why not")
    deploy = parser.add_argument_group("deployment (experimental, tokensparse.deploy; TensorRT needs a GPU machine)")
    deploy.add_argument("--engine", help="build a TensorRT engine (.plan) from the ONNX with polygraphy")
    precision = deploy.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--bf16", action="store_true")
    deploy.add_argument("--compare", action="store_true", help="polygraphy: the engine against ONNX Runtime")
    deploy.add_argument("--max-batch", type=int, default=32, help="largest batch of the engine and the server")
    deploy.add_argument("--triton-repo", help="write a Triton Inference Server model repository here")
    return parser


def parse_args(argv=None, prog: str = "tokensparse export") -> argparse.Namespace:
    command = parser(prog)
    args = command.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print the command again
    if args.policy is None:
        command.error(required_message(policies_for(), allow_none=True))
    if args.onnx_in is not None and args.model is not None:
        command.error("give --model (to export) or --onnx-in (to rewrite an existing ONNX model), not both")
    if args.onnx_in is None and args.model is None:
        command.error("give --model (to export) or --onnx-in (to rewrite an existing ONNX model)")
    if args.onnx_in is None and args.onnx is None and args.generation is None:
        command.error("--onnx PATH is required with --model (or --generation DIR for a generative model)")
    if args.generation is not None and (args.onnx is not None or args.engine or args.triton_repo or args.plugins):
        command.error("--generation writes its own two ONNX files: give it without --onnx, --engine, --triton-repo "
                      "and --plugins")
    if args.onnx_in is not None and args.out is None and not args.explain:
        command.error("--out PATH is required with --onnx-in (or --explain alone)")
    from tokensparse.onnx.rewrite import is_same_file

    for output in ("out", "onnx", "engine"):
        for source in ("onnx_in", "checkpoint"):
            if getattr(args, output) and getattr(args, source) and is_same_file(getattr(args, output),
                                                                                 getattr(args, source)):
                command.error(f"--{output} {getattr(args, output)} is the --{source.replace('_', '-')} file (or a "
                              f"link to it): write elsewhere")
    for option in ignored_options(args, argv):
        print(f"warning: {option}", file=sys.stderr)
    return args


def ignored_options(args: argparse.Namespace, argv=None) -> list:
    """What the command line gives that this run does not read, each with the reason."""
    explicit, unset = parser(), object()       # a non-string default: argparse keeps it as it is
    explicit.set_defaults(**{name: unset for name in vars(args)})
    given = {name for name, value in vars(explicit.parse_args(argv)).items() if value is not unset}
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    ignored = ignored_policy_options(args, policies_for())
    if args.onnx_in is not None:
        ignored += [f"{flag(name)} is ignored with --onnx-in: it applies to exporting a --model"
                    for name in EXPORT_ONLY if name in given]
    else:
        ignored += [f"{flag(name)} is ignored with --model: it applies to rewriting an --onnx-in file"
                    for name in REWRITE_ONLY if name in given]
    return ignored


def run(args) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    if args.onnx_in is not None:
        return _run_onnx_rewrite(args, console)
    return _run_export(args, console)


def _run_export(args, console) -> int:
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tokensparse.export import to_onnx
    from tokensparse.cli.models import load_model

    if args.batch < 1:
        raise UserError(f"--batch {args.batch} is out of range: it must be at least 1")
    policy = policy_from_args(args)
    config = config_from_policy(policy)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"building {args.model}")
        loaded = load_model(args.model, args.random_init, args.checkpoint, args.batch)
        model, image, inputs = loaded.model, loaded.image, loaded.inputs
        if args.generation is not None:
            return _run_generation_export(args, model, inputs, policy, config, progress, task, console)
        pixels = inputs if isinstance(inputs, torch.Tensor) else inputs["pixel_values"]
        progress.update(task, description="torch.export, tokensparse passes, ONNX")
        result = to_onnx(model, (inputs,) if isinstance(inputs, torch.Tensor) else inputs, config, args.onnx,
                         dynamic=not args.static, opset=args.opset, plugins=args.plugins)
        progress.update(task, description="done")
    what = f"with {policy.name} built in" if result.changed else f"unpruned ({result.reason})"
    console.print(f"wrote {result.path}: {what}; inputs {result.input_names}, outputs {result.output_names}")
    status = 0
    if args.check and args.plugins == "kernel":
        status |= checks.check_kernel_plugins(model, config, result, pixels, console)
    elif args.check and args.plugins:
        console.print("check skipped: ONNX Runtime has no kernels for the TensorRT plugin nodes")
    elif args.check and isinstance(inputs, dict):
        status |= checks.check_vlm(model, policy if result.changed else None, result, inputs, console)
    elif args.check:
        status |= checks.check_against_pytorch(model, config, result, pixels, console)
    if args.check_trt:
        status |= checks.check_trt(result.path, console)
    engine = None
    if args.engine:
        engine, engine_status = deploy.build_engine(args, result, image, console)
        status = status or engine_status
    if args.triton_repo:
        deploy.write_repository(args, result, engine, console)
    return status


def _run_generation_export(args, model, inputs, policy, config, progress, task, console) -> int:
    from tokensparse.export.generation import to_onnx_generation
    from tokensparse.runtime.hf_model import is_generative

    if not isinstance(inputs, dict) or not is_generative(model):
        raise UserError(f"--generation exports a generative model's prefill and decode step; {args.model} is not "
                        f"one (use --onnx)")
    progress.update(task, description="torch.export, tokensparse passes, ONNX: prefill and decode step")
    result = to_onnx_generation(model, inputs, config, args.generation, dynamic=not args.static, opset=args.opset)
    progress.update(task, description="done")
    what = f"with {policy.name} built in" if result.prefill.changed else f"unpruned ({result.prefill.reason})"
    console.print(f"wrote {result.prefill.path} ({what}) and {result.decode.path}; decoder layers by cache "
                  f"length: {result.length_groups}")
    if result.max_positions is not None:
        console.print(f"a sliding-window model: the two graphs are its model for at most {result.max_positions} "
                      f"positions (prompt + new tokens - 1; prefill.onnx metadata tokensparse.max_positions)")
    status = checks.check_generation(model, policy if result.prefill.changed else None, result, inputs, console) \
        if args.check else 0
    if args.check_trt:
        status |= checks.check_trt(result.prefill.path, console) | checks.check_trt(result.decode.path, console)
    return status


def _run_onnx_rewrite(args, console) -> int:
    from tokensparse.export import rewrite_onnx

    result = rewrite_onnx(args.onnx_in, args.out, config_from_policy(policy_from_args(args)), explain=args.explain)
    console.print(str(result))
    if result.reason is not None:
        return NOTHING_WRITTEN
    if args.check_trt and args.out:
        return checks.check_trt(args.out, console)
    return 0


def main(argv=None, prog: str = "tokensparse export") -> int:
    args = parse_args(argv, prog)
    try:
        return run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
