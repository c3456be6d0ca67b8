"""Ahead-of-time compilation of the plugin kernels for TensorRT's AOT plugins (trtp.aot_impl): Triton
compiles a kernel to PTX for a GPU architecture on any machine, no GPU needed. TensorRT embeds the PTX in
the engine and launches it itself, so the engine runs from C++ without Python.

TensorRT passes a kernel its input pointers, then the int32 scalars the plugin declares, then its output
pointers, and nothing else. The kernels are written in that order, and compile_for_tensorrt checks it.
Triton also appends its own scratch-buffer pointers to every kernel. TensorRT would not pass them, so they
are removed from the PTX's entry, after checking that the kernel asks for no scratch memory and never reads
them."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

DEFAULT_ARCH = 80  # PTX for sm_80 runs on Ampere and later; the driver compiles it for the GPU it runs on.
MAX_STATIC_SHARED = 48 * 1024  # above this a launch needs an opt-in that TensorRT's AOT launch does not make

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                torch.int32: "i32"}


class AotCompileError(RuntimeError):
    """A kernel cannot be handed to TensorRT's AOT launch; the message says why."""


@dataclass(frozen=True)
class CompiledKernel:
    """What trtp.aot_impl returns for one kernel, less the launch grid and scalars (which depend on shapes)."""

    name: str
    ptx: str
    threads: int
    shared_memory: int
    parameters: tuple  # the entry's PTX parameter types, in order


def compile_for_tensorrt(kernel, inputs: dict, outputs: dict, constants: dict, arch: int = DEFAULT_ARCH):
    """Compile a @triton.jit `kernel` whose parameters are `inputs` (name -> torch dtype of the pointed-to
    tensor), then int32 scalars, then `outputs`, then the constexprs in `constants`."""
    import inspect

    function = kernel.fn  # the Python function under @triton.jit (interpreted or not)
    pointers = {**inputs, **outputs}
    signature, order = {}, []
    for name, parameter in inspect.signature(function).parameters.items():
        if _is_constexpr(parameter.annotation):
            if name not in constants:
                raise AotCompileError(f"{kernel.__name__}: no value for the compile-time parameter {name}")
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + TRITON_TYPES[pointers[name]]
            order.append("input" if name in inputs else "output")
        else:
            signature[name] = "i32"
            order.append("scalar")
    expected = sorted(order, key=("input", "scalar", "output").index)
    if order != expected:
        raise AotCompileError(f"{kernel.__name__}: parameters must be inputs, then scalars, then outputs "
                              f"(TensorRT's AOT launch order); they are {order}")
    declared = [name for name in signature if name in pointers]
    if declared != [*inputs, *outputs]:
        raise AotCompileError(f"{kernel.__name__}: its pointers come in the order {declared}; the plugin passes "
                              f"{[*inputs, *outputs]}")
    frozen = tuple(sorted((name, signature[name]) for name in signature))
    return _compile(function.__module__, function.__name__, frozen, tuple(sorted(constants.items())), arch,
                    len(order))


def _is_constexpr(annotation) -> bool:
    import triton.language as tl

    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr")


@functools.cache
def _compile(module: str, kernel_name: str, signature: tuple, constants: tuple, arch: int,
             parameters: int) -> CompiledKernel:
    from triton import knobs

    if knobs.runtime.interpret:
        return _compile_in_subprocess(module, kernel_name, signature, constants, arch, parameters)
    kernel = getattr(importlib.import_module(module), kernel_name)
    return _compile_here(kernel, signature, constants, arch, parameters)


def _compile_in_subprocess(module, kernel_name, signature, constants, arch, parameters) -> CompiledKernel:
    """Under TRITON_INTERPRET=1 every @triton.jit function, Triton's own tl.sum included, is an interpreted
    function that does not compile: compile in a Python without the interpreter."""
    request = {"module": module, "kernel": kernel_name, "signature": signature, "constants": constants,
               "arch": arch, "parameters": parameters}
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request), capture_output=True,
                          text=True, env=environment)
    if done.returncode != 0:
        raise AotCompileError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                              f"compiling {kernel_name} failed")
    answer = json.loads(done.stdout)
    return CompiledKernel(answer["name"], answer["ptx"], answer["threads"], answer["shared_memory"],
                          tuple(answer["parameters"]))


def _compile_here(kernel, signature: tuple, constants: tuple, arch: int, parameters: int) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ordered = dict(signature)
    source = ASTSource(fn=kernel, signature={name: ordered[name] for name in kernel.arg_names},
                       constexprs=dict(constants))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    metadata = compiled.metadata
    if metadata.shared > MAX_STATIC_SHARED:
        raise AotCompileError(f"{compiled.name} needs {metadata.shared} bytes of shared memory; TensorRT's AOT "
                              f"launch gives at most {MAX_STATIC_SHARED}")
    ptx, types = _without_scratch_parameters(compiled.asm["ptx"], compiled.name, parameters, metadata)
    return CompiledKernel(compiled.name, ptx, metadata.num_warps * 32, metadata.shared, types)


def _without_scratch_parameters(ptx: str, name: str, parameters: int, metadata):
    """Drop the pointer parameters Triton appends after the kernel's own (global and profile scratch)."""
    entry = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.S)
    if entry is None:
        raise AotCompileError(f"no .entry {name} in the PTX Triton wrote")
    declared = [line.strip().rstrip(",") for line in entry.group(1).strip().splitlines()]
    extra = declared[parameters:]
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, field, 0):
            raise AotCompileError(f"{name} asks for {field}={getattr(metadata, field)}; TensorRT's AOT launch "
                                  f"passes no scratch buffer")
    body = ptx[entry.end():]
    for index in range(parameters, len(declared)):
        if re.search(rf"\b{re.escape(name)}_param_{index}\b", body):
            raise AotCompileError(f"{name} reads its parameter {index}, which TensorRT's AOT launch does not pass")
    if any(".ptr" not in parameter for parameter in extra):
        raise AotCompileError(f"{name}: unexpected parameters after its own: {extra}")
    kept = declared[:parameters]
    header = "\n".join("\t" + parameter + ("," if i < len(kept) - 1 else "") for i, parameter in enumerate(kept))
    ptx = ptx[:entry.start(1)] + "\n" + header + "\n" + ptx[entry.end(1):]
    types = tuple(".u64" if ".u64" in parameter else parameter.split()[1] for parameter in kept)
    return ptx, types


def _serve_one_request() -> None:
    """python -m tokensparse.deploy.trt_aot: compile the kernel a JSON request on stdin names; JSON out."""
    request = json.load(sys.stdin)
    kernel = getattr(importlib.import_module(request["module"]), request["kernel"])
    signature = tuple(tuple(pair) for pair in request["signature"])
    constants = tuple(tuple(pair) for pair in request["constants"])
    json.dump(asdict(_compile_here(kernel, signature, constants, request["arch"], request["parameters"])), sys.stdout)


if __name__ == "__main__":
    _serve_one_request()
