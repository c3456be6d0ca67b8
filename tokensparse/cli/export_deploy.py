"""The deployment steps of `tokensparse export` (experimental, tokensparse.deploy): a TensorRT engine built
from the exported ONNX, and a Triton Inference Server model repository."""

from __future__ import annotations

import os
import shlex


def build_engine(args, result, image, console):
    """(engine path or None, status): 3 when TensorRT or a GPU is missing here."""
    from tokensparse.deploy.tensorrt import build_engine, compare_with_onnxruntime, gpu_command, missing_for_tensorrt

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    batches = (args.batch,) * 3 if args.static else (1, min(8, args.max_batch), args.max_batch)
    missing = missing_for_tensorrt()
    if missing is not None and args.plugins:
        console.print(f"no TensorRT engine built: {missing}. The plugins are registered from Python while the "
                      f"engine is built, so run this same command on a machine with TensorRT and a GPU:\n  "
                      f"{shlex.join(['tokensparse', 'export', *args.argv])}")
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


def write_repository(args, result, engine, console) -> None:
    """The Triton Inference Server model repository for the ONNX (or the engine, where one was built)."""
    if args.plugins and engine is None:
        console.print("no Triton Inference Server repository written: the ONNX holds TensorRT plugin nodes, which "
                      "the onnxruntime backend cannot run; write it where the engine is built")
        return
    from tokensparse.deploy.triton_server import write_model_repository

    name = os.path.splitext(os.path.basename(args.onnx))[0]
    # A fixed batch axis cannot be batched by the server: max_batch_size 0 keeps it in the dims.
    config = write_model_repository(args.triton_repo, name, result.path, engine,
                                    0 if args.static else args.max_batch, args.plugins)
    console.print(f"wrote the Triton Inference Server repository {args.triton_repo} ({config})")
