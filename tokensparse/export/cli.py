"""The `tools/export.py` command line: a model and a policy in, a pruned ONNX file out, checked against
PyTorch with ONNX Runtime and against TensorRT's ONNX operator support on request."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

EXAMPLES = """examples:
  python tools/export.py --model vit_base_patch16_224 --random-init --policy tome --r 13 --onnx out/vit.onnx --check
  python tools/export.py --model path/to/hf_config_dir --random-init --policy topk --layers 3 6 9 --keep 0.5 \\
      --onnx out/clip.onnx --check-trt
  python tools/export.py --onnx-in model.onnx --policy tome --r 8 --out pruned.onnx
  python tools/export.py --model vit_base_patch16_224 --random-init --onnx out/vit.onnx --engine out/vit.plan --fp16 \
      --compare --triton-repo out/models

exit status: 0 done, 1 a check failed, 2 bad input, 3 no TensorRT engine could be built here (GPU/TensorRT missing)
"""


class UserError(Exception):
    """A problem with the command line or its inputs, printed without a traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/export.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--model", help="a timm model name, or a Hugging Face config/checkpoint directory")
    source.add_argument("--random-init", action="store_true", help="random seeded weights (no download)")
    source.add_argument("--checkpoint", help="a state_dict file for a timm model")
    source.add_argument("--onnx-in", help="rewrite this existing ONNX model instead of exporting one")
    policy = parser.add_argument_group("policy")
    policy.add_argument("--policy", default="tome", choices=["tome", "topk", "none"])
    policy.add_argument("--r", type=int, default=13, help="tome: tokens merged per block")
    policy.add_argument("--schedule", default="constant", choices=["constant", "decreasing"])
    policy.add_argument("--no-proportional-attention", action="store_true")
    policy.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9], help="topk: blocks to prune at")
    policy.add_argument("--keep", type=float, default=0.7, help="topk: fraction of patch tokens kept")
    policy.add_argument("--fuse", action="store_true", help="topk: append the dropped tokens' weighted mean")
    output = parser.add_argument_group("output")
    output.add_argument("--onnx", help="where to write the exported ONNX model")
    output.add_argument("--out", help="with --onnx-in: where to write the rewritten model")
    output.add_argument("--opset", type=int, default=18)
    output.add_argument("--batch", type=int, default=2, help="batch of the example input")
    output.add_argument("--static", action="store_true", help="fixed batch axis (default: dynamic)")
    output.add_argument("--plugins", action="store_true",
                        help="write each policy step as a TensorRT plugin node instead of standard ONNX ops")
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
    args = parser.parse_args(argv)
    if args.onnx_in is None and args.model is None:
        parser.error("give --model (to export) or --onnx-in (to rewrite an existing ONNX model)")
    if args.onnx_in is None and args.onnx is None:
        parser.error("--onnx PATH is required with --model")
    if args.onnx_in is not None and args.out is None and not args.explain:
        parser.error("--out PATH is required with --onnx-in (or --explain alone)")
    return args


def policy_from_args(args):
    from tokensparse import ToMe, TopK

    if args.policy == "none":
        return None
    if args.policy == "tome":
        return ToMe(r=args.r, schedule=args.schedule, proportional_attention=not args.no_proportional_attention)
    return TopK(layers=tuple(args.layers), keep=args.keep, fuse=args.fuse)


def load_model(name: str, random_init: bool, checkpoint: Optional[str]):
    """(model in eval mode, example image shape [C, H, W]) from a timm name or a HF directory."""
    import torch

    torch.manual_seed(0)
    if os.path.isdir(name):
        return _load_transformers(name, random_init)
    import timm

    if not timm.is_model(name):
        raise UserError(f"--model {name!r} is neither a timm model name nor a directory with a Hugging Face "
                        f"config.json")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint {checkpoint!r}: file not found")
    try:
        model = timm.create_model(name, pretrained=not (random_init or checkpoint))
    except Exception as error:  # noqa: BLE001 - a failed download, said plainly
        raise UserError(f"could not load pretrained weights for {name!r} ({type(error).__name__}); use "
                        f"--random-init or --checkpoint FILE") from error
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval(), tuple(model.default_cfg.get("input_size", (3, 224, 224)))


def _load_transformers(directory: str, random_init: bool):
    import transformers

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise UserError(f"--model {directory!r} is a directory without a config.json")
    config = transformers.AutoConfig.from_pretrained(directory)
    vision = getattr(config, "vision_config", None) or config
    if random_init:
        model = transformers.AutoModel.from_config(vision)
    else:
        model = transformers.AutoModel.from_pretrained(directory)
        model = getattr(model, "vision_model", model)
    size = getattr(vision, "image_size", 224)
    return model.eval(), (getattr(vision, "num_channels", 3), size, size)


def run(args) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    if args.onnx_in is not None:
        return _run_onnx_rewrite(args, console)
    return _run_export(args, console)


def _run_export(args, console) -> int:
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tokensparse import Config
    from tokensparse.export import to_onnx

    if args.batch < 1:
        raise UserError(f"--batch {args.batch} is out of range: it must be at least 1")
    policy = policy_from_args(args)
    config = Config(vision=policy)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"building {args.model}")
        model, image = load_model(args.model, args.random_init, args.checkpoint)
        pixels = torch.randn(args.batch, *image, generator=torch.Generator().manual_seed(0))
        progress.update(task, description="torch.export, tokensparse passes, ONNX")
        result = to_onnx(model, (pixels,), config, args.onnx, dynamic=not args.static, opset=args.opset,
                         plugins=args.plugins)
        progress.update(task, description="done")
    what = f"with {policy.name} built in" if result.changed else f"unpruned ({result.reason})"
    console.print(f"wrote {result.path}: {what}; inputs {result.input_names}, outputs {result.output_names}")
    status = 0
    if args.check and args.plugins:
        console.print("check skipped: ONNX Runtime has no kernels for the TensorRT plugin nodes")
    elif args.check:
        status |= _check_against_pytorch(model, config, result, pixels, console)
    if args.check_trt:
        status |= _check_trt(result.path, console)
    engine = None
    if args.engine:
        engine, engine_status = _build_engine(args, result, image, console)
        status = status or engine_status
    if args.triton_repo:
        from tokensparse.export.triton_server import write_model_repository

        name = os.path.splitext(os.path.basename(args.onnx))[0]
        # A fixed batch axis cannot be batched by the server: max_batch_size 0 keeps it in the dims.
        config = write_model_repository(args.triton_repo, name, result.path, engine,
                                        0 if args.static else args.max_batch)
        console.print(f"wrote the Triton Inference Server repository {args.triton_repo} ({config})")
    return status


def _build_engine(args, result, image, console):
    """(engine path or None, status): 3 when TensorRT or a GPU is missing here."""
    from tokensparse.export.tensorrt import build_engine, compare_with_onnxruntime, gpu_command, missing_for_tensorrt

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    batches = (args.batch,) * 3 if args.static else (1, min(8, args.max_batch), args.max_batch)
    missing = missing_for_tensorrt()
    if missing is not None:
        command = gpu_command(result.path, args.engine, result.input_names[0], image, precision, batches)
        console.print(f"no TensorRT engine built: {missing}. The ONNX model is ready at {result.path}; on a "
                      f"machine with TensorRT and a GPU run:\n  {command}")
        return None, 3
    build_engine(result.path, args.engine, result.input_names[0], image, precision, batches)
    console.print(f"wrote the TensorRT engine {args.engine} ({precision}, batch {batches[0]}..{batches[2]})")
    if args.compare and not compare_with_onnxruntime(result.path, args.engine):
        console.print("[red]polygraphy: the engine and ONNX Runtime disagree[/red]")
        return args.engine, 1
    return args.engine, 0


def _check_against_pytorch(model, config, result, pixels, console) -> int:
    """ONNX Runtime against the pruned PyTorch model (the tokensparse backend run eagerly)."""
    import onnxruntime
    import torch

    from tokensparse.backend import tokensparse_backend

    options = config if config.policy is not None else None
    reference = torch.compile(model, backend=tokensparse_backend, options=_eager(options)) if options else model
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = reference(pixels)
    want = want if isinstance(want, torch.Tensor) else want[0]
    [got, *_] = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    got = torch.from_numpy(got)
    if got.shape != want.shape:
        console.print(f"[red]check failed[/red]: ONNX Runtime gives shape {tuple(got.shape)}, PyTorch "
                      f"{tuple(want.shape)}")
        return 1
    error = (got - want).abs().max().item()
    relative = error / max(want.abs().max().item(), 1e-12)
    ok = relative <= 1e-4
    console.print(f"check: ONNX Runtime vs pruned PyTorch, max |error| {error:.2e} (relative {relative:.2e}): "
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
    from tokensparse import Config
    from tokensparse.export import rewrite_onnx

    result = rewrite_onnx(args.onnx_in, args.out, Config(vision=policy_from_args(args)), explain=args.explain)
    console.print(str(result))
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
