"""TensorRT engines from the exported ONNX, through polygraphy's loaders (optimization profiles for the
dynamic batch axis) and its comparator against ONNX Runtime. Thin and import-guarded: TensorRT and a
GPU are not available on every machine, and without them this says what is missing."""

from __future__ import annotations

import importlib.util
import shlex
from typing import Optional


def missing_for_tensorrt() -> Optional[str]:
    """None when an engine can be built here, else what is missing."""
    missing = [name for name in ("tensorrt", "polygraphy") if importlib.util.find_spec(name) is None]
    if missing:
        return "Python packages " + " and ".join(missing) + " are not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def gpu_command(onnx_path: str, engine_path: str, input_name: str, input_shape: tuple, precision: str,
                batch_range: tuple = (1, 8, 32)) -> str:
    """The polygraphy command that builds the same engine on a machine with TensorRT and a GPU."""
    flags = {"fp32": "", "fp16": " --fp16", "bf16": " --bf16"}[precision]
    shapes = [f"{input_name}:[{','.join(map(str, (batch, *input_shape)))}]" for batch in batch_range]
    return (f"polygraphy convert {shlex.quote(onnx_path)} --convert-to trt -o {shlex.quote(engine_path)}{flags} "
            f"--trt-min-shapes {shapes[0]} --trt-opt-shapes {shapes[1]} --trt-max-shapes {shapes[2]}")


def build_engine(onnx_path: str, engine_path: str, input_name: str, input_shape: tuple, precision: str = "fp32",
                 batch_range: tuple = (1, 8, 32), plugins: bool = False) -> str:
    """Build and save an engine whose batch axis spans batch_range (min, opt, max); `plugins`: the ONNX holds
    tokensparse plugin nodes, registered first (the kernel plugins' PTX for this GPU's architecture)."""
    import torch
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    if plugins:
        from tokensparse.deploy.trt_plugins import register_plugins

        major, minor = torch.cuda.get_device_capability()
        register_plugins(arch=10 * major + minor)

    low, opt, high = batch_range
    profile = Profile().add(input_name, min=(low, *input_shape), opt=(opt, *input_shape), max=(high, *input_shape))
    config = CreateConfig(fp16=precision == "fp16", bf16=precision == "bf16", profiles=[profile])
    SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(onnx_path), config=config), path=engine_path)()
    return engine_path


def compare_with_onnxruntime(onnx_path: str, engine_path: str) -> bool:
    """polygraphy's comparison of the engine against ONNX Runtime on the same random inputs."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    runners = [TrtRunner(EngineFromBytes(BytesFromPath(engine_path))), OnnxrtRunner(SessionFromOnnx(onnx_path))]
    return bool(Comparator.compare_accuracy(Comparator.run(runners)))
