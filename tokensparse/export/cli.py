"""The `tools/export.py` command line: a model and a policy in, a pruned ONNX file out, checked against
PyTorch with ONNX Runtime and against TensorRT's ONNX operator support on request."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

EXAMPLES = """examples:
  python tools/export.py --model vit_base_patch16_224 --random-init --policy tome --r 13 --onnx out/vit.onnx --check
  python tools/export.py --model path/to/hf_config_dir --random-init --policy topk --layers 3 6 9 --keep 0.5 \\
      --onnx out/clip.onnx --check-trt
  python tools/export.py --onnx-in model.onnx --policy tome --r 8 --out pruned.onnx
  python tools/export.py --model path/to/llava_config_dir --random-init --policy fastv --keep 0.25 --static \
      --generation out/llava_fastv --check      # prefill.onnx + decode.onnx, the KV cache in and out
  python tools/export.py --model vit_base_patch16_224 --random-init --policy tome --onnx out/vit.onnx --engine out/vit.plan \
      --fp16 --compare --triton-repo out/models

exit status: 0 done, 1 a check failed, 2 bad input, 3 no TensorRT engine could be built (no GPU or no TensorRT on the machine),
             4 the ONNX model did not match the rewrite (--onnx-in): nothing written
"""

# The options that only one kind of run or only some policies read; given elsewhere, they are ignored with a warning.
POLICY_OPTIONS = {"r": ("tome",), "schedule": ("tome",), "no_proportional_attention": ("tome",),
                  "layers": ("topk", "pyramiddrop"), "keep": ("topk", "fastv"), "layer": ("fastv", "exit"),
                  "query": ("fastv",), "ratio": ("pyramiddrop",), "fuse": ("topk",), "dominant": ("visionzip",),
                  "contextual": ("visionzip",)}
EXPORT_ONLY = ("random_init", "checkpoint", "onnx", "generation", "opset", "batch", "static", "plugins", "check",
               "engine", "fp16", "bf16", "compare", "max_batch", "triton_repo")
REWRITE_ONLY = ("out", "explain")
NOTHING_WRITTEN = 4


class UserError(Exception):
    """A problem with the command line or its inputs, printed without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/export.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--model", help="a timm model name, or a Hugging Face config/checkpoint directory")
    source.add_argument("--random-init", action="store_true", help="random seeded weights (no download)")
    source.add_argument("--checkpoint", help="a state_dict file for a timm model")
    source.add_argument("--onnx-in", help="rewrite this existing ONNX model instead of exporting one")
    policy = parser.add_argument_group("policy")
    policy.add_argument("--policy", choices=["tome", "topk", "fastv", "pyramiddrop", "exit", "visionzip", "none"],
                        help="(required) tome/topk: vision transformers; fastv/pyramiddrop/exit/visionzip: a LLaVA "
                             "model; none: export unchanged")
    policy.add_argument("--r", type=int, default=13, help="tome: tokens merged per block")
    policy.add_argument("--schedule", default="constant", choices=["constant", "decreasing"])
    policy.add_argument("--no-proportional-attention", action="store_true")
    policy.add_argument("--layers", type=int, nargs="+", help="topk: blocks to prune at (3 6 9); pyramiddrop: "
                                                                   "decoder layers (8 16 24)")
    policy.add_argument("--keep", type=float, help="topk: fraction of patch tokens kept (0.7); fastv: of vision "
                                                   "tokens (0.5)")
    policy.add_argument("--layer", type=int, help="fastv: decoder layer K (2); exit: the layer from which no "
                                                  "vision token is left (16)")
    policy.add_argument("--query", default="last", choices=["last", "text"], help="fastv: whose attention ranks")
    policy.add_argument("--ratio", type=float, default=0.5, help="pyramiddrop: fraction kept at each stage")
    policy.add_argument("--fuse", action="store_true", help="topk: append EViT's fused token (the dropped tokens weighted by their attention)")
    policy.add_argument("--dominant", type=int, default=54, help="visionzip: dominant image tokens kept")
    policy.add_argument("--contextual", type=int, default=10, help="visionzip: contextual (merged) image tokens")
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
    deploy = parser.add_argument_group("deployment (TensorRT needs a GPU machine)")
    deploy.add_argument("--engine", help="build a TensorRT engine (.plan) from the ONNX with polygraphy")
    precision = deploy.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--bf16", action="store_true")
    deploy.add_argument("--compare", action="store_true", help="polygraphy: the engine against ONNX Runtime")
    deploy.add_argument("--max-batch", type=int, default=32, help="largest batch of the engine and the server")
    deploy.add_argument("--triton-repo", help="write a Triton Inference Server model repository here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print the command again
    if args.policy is None:
        parser.error("--policy is required: tome or topk for a vision transformer, fastv, pyramiddrop, exit or "
                     "visionzip for a LLaVA model, none to export the model unchanged")
    if args.onnx_in is not None and args.model is not None:
        parser.error("give --model (to export) or --onnx-in (to rewrite an existing ONNX model), not both")
    if args.onnx_in is None and args.model is None:
        parser.error("give --model (to export) or --onnx-in (to rewrite an existing ONNX model)")
    if args.onnx_in is None and args.onnx is None and args.generation is None:
        parser.error("--onnx PATH is required with --model (or --generation DIR for a generative model)")
    if args.generation is not None and (args.onnx is not None or args.engine or args.triton_repo or args.plugins):
        parser.error("--generation writes its own two ONNX files: give it without --onnx, --engine, --triton-repo "
                     "and --plugins")
    if args.onnx_in is not None and args.out is None and not args.explain:
        parser.error("--out PATH is required with --onnx-in (or --explain alone)")
    from tokensparse.export.onnx_rewrite import is_same_file

    for output in ("out", "onnx", "engine"):
        for source in ("onnx_in", "checkpoint"):
            if getattr(args, output) and getattr(args, source) and is_same_file(getattr(args, output),
                                                                                 getattr(args, source)):
                parser.error(f"--{output} {getattr(args, output)} is the --{source.replace('_', '-')} file (or a link "
                             f"to it): write elsewhere")
    for option in ignored_options(args, argv):
        print(f"warning: {option}", file=sys.stderr)
    return args


def ignored_options(args: argparse.Namespace, argv=None) -> list:
    """What the command line gives that this run does not read, each with the reason."""
    explicit, unset = _parser(), object()       # a non-string default: argparse keeps it as it is
    explicit.set_defaults(**{name: unset for name in vars(args)})
    given = {name for name, value in vars(explicit.parse_args(argv)).items() if value is not unset}
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    ignored = [f"{flag(name)} is ignored with --policy {args.policy}: it is read by --policy {' and '.join(users)}"
               for name, users in POLICY_OPTIONS.items() if name in given and args.policy not in users]
    if args.onnx_in is not None:
        ignored += [f"{flag(name)} is ignored with --onnx-in: it applies to exporting a --model"
                    for name in EXPORT_ONLY if name in given]
    else:
        ignored += [f"{flag(name)} is ignored with --model: it applies to rewriting an --onnx-in file"
                    for name in REWRITE_ONLY if name in given]
    return ignored


def policy_from_args(args):
    from tokensparse import ToMe, TopK
    from tokensparse.policies import FastV, PyramidDrop, VisionZip, VisualExit

    def given(**options):
        return {name: value for name, value in options.items() if value is not None}

    layers = tuple(args.layers) if args.layers else None
    if args.policy == "none":
        return None
    if args.policy == "tome":
        return ToMe(r=args.r, schedule=args.schedule, proportional_attention=not args.no_proportional_attention)
    if args.policy == "topk":
        return TopK(**given(layers=layers or (3, 6, 9), keep=0.7 if args.keep is None else args.keep), fuse=args.fuse)
    if args.policy == "fastv":
        return FastV(**given(layer=args.layer, keep=args.keep), query=args.query)
    if args.policy == "pyramiddrop":
        return PyramidDrop(**given(layers=layers), ratio=args.ratio)
    if args.policy == "visionzip":
        return VisionZip(dominant=args.dominant, contextual=args.contextual)
    return VisualExit(**given(layer=args.layer))


def config_from_policy(policy):
    from tokensparse import Config
    from tokensparse.policies import LanguagePolicy

    return Config(llm=policy) if isinstance(policy, LanguagePolicy) else Config(vision=policy)


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
    from tokensparse.export.cli_models import load_model

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
        status |= _check_kernel_plugins(model, config, result, pixels, console)
    elif args.check and args.plugins:
        console.print("check skipped: ONNX Runtime has no kernels for the TensorRT plugin nodes")
    elif args.check and isinstance(inputs, dict):
        status |= _check_vlm(model, policy if result.changed else None, result, inputs, console)
    elif args.check:
        status |= _check_against_pytorch(model, config, result, pixels, console)
    if args.check_trt:
        status |= _check_trt(result.path, console)
    engine = None
    if args.engine:
        engine, engine_status = _build_engine(args, result, image, console)
        status = status or engine_status
    if args.triton_repo and args.plugins and engine is None:
        console.print("no Triton Inference Server repository written: the ONNX holds TensorRT plugin nodes, which "
                      "the onnxruntime backend cannot run; write it where the engine is built")
    elif args.triton_repo:
        from tokensparse.export.triton_server import write_model_repository

        name = os.path.splitext(os.path.basename(args.onnx))[0]
        # A fixed batch axis cannot be batched by the server: max_batch_size 0 keeps it in the dims.
        config = write_model_repository(args.triton_repo, name, result.path, engine,
                                        0 if args.static else args.max_batch, args.plugins)
        console.print(f"wrote the Triton Inference Server repository {args.triton_repo} ({config})")
    return status


def _run_generation_export(args, model, inputs, policy, config, progress, task, console) -> int:
    from tokensparse.export.generation import to_onnx_generation
    from tokensparse.runtime.hf import is_generative

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
    status = _check_generation(model, policy if result.prefill.changed else None, result, inputs, console) \
        if args.check else 0
    if args.check_trt:
        status |= _check_trt(result.prefill.path, console) | _check_trt(result.decode.path, console)
    return status


def _check_generation(model, policy, result, inputs: dict, console, new_tokens: int = 16) -> int:
    """Greedy generation in ONNX Runtime (prefill.onnx, then decode.onnx) against generate() with the policy's
    masking oracle: the same tokens, and every step's logits within 1e-4 relative."""
    import torch

    from tokensparse.export.onnx_generate import generate_onnx
    from tokensparse.reference.llava import masked_generate

    got = generate_onnx(result.directory, {name: value.numpy() for name, value in inputs.items()}, new_tokens)
    want = masked_generate(model, inputs, policy, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    against = "generate() with the masking oracle" if policy else "generate()"
    if not torch.equal(got.tokens, want.sequences[:, -new_tokens:]):
        console.print(f"[red]check failed[/red]: ONNX Runtime's {new_tokens} greedy tokens differ from {against}")
        return 1
    return _report_check(torch.stack(got.logits, 1), torch.stack(want.logits, 1), against, console)


def _build_engine(args, result, image, console):
    """(engine path or None, status): 3 when TensorRT or a GPU is missing here."""
    from tokensparse.export.tensorrt import build_engine, compare_with_onnxruntime, gpu_command, missing_for_tensorrt

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    batches = (args.batch,) * 3 if args.static else (1, min(8, args.max_batch), args.max_batch)
    missing = missing_for_tensorrt()
    if missing is not None and args.plugins:
        console.print(f"no TensorRT engine built: {missing}. The plugins are registered from Python while the "
                      f"engine is built, so run this same command on a machine with TensorRT and a GPU:\n  "
                      f"{shlex.join(['python', 'tools/export.py', *args.argv])}")
        return None, 3
    if missing is not None:
        command = gpu_command(result.path, args.engine, result.input_names[0], image, precision, batches)
        console.print(f"no TensorRT engine built: {missing}. The ONNX model is ready at {result.path}; on a "
                      f"machine with TensorRT and a GPU run:\n  {command}")
        return None, 3
    build_engine(result.path, args.engine, result.input_names[0], image, precision, batches,
                 plugins=bool(args.plugins))
    console.print(f"wrote the TensorRT engine {args.engine} ({precision}, batch {batches[0]}..{batches[2]})")
    if args.compare and args.plugins:
        console.print("compare skipped: ONNX Runtime cannot run the plugin nodes (--check runs the ONNX with the "
                      "plugin kernels against PyTorch)")
    elif args.compare and not compare_with_onnxruntime(result.path, args.engine):
        console.print("[red]polygraphy: the engine and ONNX Runtime disagree[/red]")
        return args.engine, 1
    return args.engine, 0


def _check_against_pytorch(model, config, result, pixels, console) -> int:
    """ONNX Runtime against the pruned PyTorch model (the tokensparse backend run eagerly)."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    [got, *_] = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    return _report_check(torch.from_numpy(got), _pruned_pytorch_output(model, config, pixels), "pruned PyTorch",
                         console)


def _pruned_pytorch_output(model, config, pixels):
    """The model's (first) output on `pixels` with the config's policy: the tokensparse backend run eagerly."""
    import torch

    from tokensparse.backend import tokensparse_backend

    options = config if config.policy is not None else None
    reference = torch.compile(model, backend=tokensparse_backend, options=_eager(options)) if options else model
    with torch.no_grad():
        want = reference(pixels)
    return want if isinstance(want, torch.Tensor) else want[0]


def _check_kernel_plugins(model, config, result, pixels, console) -> int:
    """The kernel-plugin ONNX (onnx's reference evaluator, each plugin launched as TensorRT would) against the
    pruned PyTorch model."""
    import torch

    from tokensparse.export.plugin_eval import run_with_kernel_plugins

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        console.print("check skipped: no GPU here, and the plugin kernels run on the CPU only under Triton's "
                      "interpreter: rerun with TRITON_INTERPRET=1")
        return 0
    [got, *_] = run_with_kernel_plugins(result.path, {result.input_names[0]: pixels.numpy()}, device)
    runner = f"the ONNX with its plugin kernels launched as TensorRT would ({device})"
    return _report_check(torch.from_numpy(got), _pruned_pytorch_output(model, config, pixels), "pruned PyTorch",
                         console, runner=runner)


def _check_vlm(model, policy, result, inputs: dict, console) -> int:
    """ONNX Runtime's logits against the masking oracle's at the kept positions (tokensparse.reference.llava)."""
    import onnxruntime
    import torch

    from tokensparse.reference.llava import masked_forward

    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    [got, *_] = session.run(None, {value.name: inputs[value.name].numpy() for value in session.get_inputs()})
    if policy is None:
        with torch.no_grad():
            want = model(**inputs, use_cache=False).logits
    else:
        reference = masked_forward(model, inputs, policy)
        kept = reference["kept"].unsqueeze(-1).expand(-1, -1, reference["logits"].shape[-1])
        want = reference["logits"].gather(1, kept)
    return _report_check(torch.from_numpy(got), want, "the masking oracle" if policy else "PyTorch", console)


def _report_check(got, want, against: str, console, runner: str = "ONNX Runtime") -> int:
    if got.shape != want.shape:
        console.print(f"[red]check failed[/red]: {runner} gives shape {tuple(got.shape)}, {against} "
                      f"{tuple(want.shape)}")
        return 1
    error = (got - want).abs().max().item()
    relative = error / max(want.abs().max().item(), 1e-12)
    ok = relative <= 1e-4
    console.print(f"check: {runner} vs {against}, max |error| {error:.2e} (relative {relative:.2e}): "
                  + ("[green]ok[/green]" if ok else "[red]too large[/red]"))
    return 0 if ok else 1


def _eager(config):
    import dataclasses

    return dataclasses.replace(config, inductor=False)


def _check_trt(path: str, console) -> int:
    from tokensparse.export.trt_check import check_tensorrt

    report = check_tensorrt(path)
    console.print(str(report))
    return 0 if report.ok else 1


def _run_onnx_rewrite(args, console) -> int:
    from tokensparse.export import rewrite_onnx

    result = rewrite_onnx(args.onnx_in, args.out, config_from_policy(policy_from_args(args)), explain=args.explain)
    console.print(str(result))
    if result.reason is not None:
        return NOTHING_WRITTEN
    if args.check_trt and args.out:
        return _check_trt(args.out, console)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
