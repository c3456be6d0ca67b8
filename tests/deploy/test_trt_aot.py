"""Ahead-of-time PTX for TensorRT's AOT plugins, compiled here without a GPU: ptxas accepts it, and its entry
takes exactly what TensorRT's launch passes (input pointers, int32 scalars, output pointers), with Triton's
scratch parameters gone. Kernels that cannot be launched that way are refused with the reason."""

import dataclasses
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.nvidia.compiler import get_ptxas

from tokensparse.deploy.kernel_plugins import MERGE_ROWS, TOPK_SELECT, TOPK_SPLIT
from tokensparse.deploy.trt_aot import AotCompileError, _without_scratch_parameters, compile_for_tensorrt

INDEX = torch.int64


def _assemble(ptx: str, arch: int, target: str, tmp_path) -> subprocess.CompletedProcess:
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    return subprocess.run([get_ptxas(arch).path, f"-arch={target}", str(source), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True)


@pytest.mark.parametrize("dtype, arch", [(torch.float32, 80), (torch.float16, 80), (torch.bfloat16, 80),
                                         (torch.float16, 90)])
@pytest.mark.parametrize("plugin, attributes", [(MERGE_ROWS, {"protected": 1}), (TOPK_SELECT, {"k": 7})],
                         ids=["merge_rows", "topk_select"])
def test_ptx_takes_what_tensorrt_passes(plugin, attributes, dtype, arch, tmp_path):
    """Compiled in a subprocess without the interpreter (tests run under TRITON_INTERPRET=1): about 3 s each."""
    dtypes = [dtype, dtype, INDEX, INDEX, INDEX] if plugin is MERGE_ROWS else [dtype]
    compiled = plugin.compile(dtypes, attributes, arch)
    scalars = {MERGE_ROWS: 4, TOPK_SELECT: 2, TOPK_SPLIT: 2}[plugin]
    assert compiled.parameters == (".u64",) * len(plugin.inputs) + (".u32",) * scalars + (".u64",) * len(plugin.outputs)
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", compiled.ptx, flags=re.S)
    assert entry.group(1) == compiled.name and entry.group(2).count(".param") == len(compiled.parameters)
    # sm_90 gives sm_90a PTX (Hopper's own features), which runs on Hopper only; sm_80's runs on later GPUs too
    target = re.search(r"\.target\s+(sm_\w+)", compiled.ptx).group(1)
    assert target == (f"sm_{arch}a" if arch == 90 else f"sm_{arch}")
    assert compiled.threads % 32 == 0 and 0 <= compiled.shared_memory <= 48 * 1024
    result = _assemble(compiled.ptx, arch, target, tmp_path)
    assert result.returncode == 0, result.stderr


@triton.jit
def _output_before_scalar(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def test_topk_split_ptx_takes_one_input_two_scalars_two_outputs(tmp_path):
    compiled = TOPK_SPLIT.compile([torch.float32], {"k": 3})
    assert compiled.parameters == (".u64", ".u32", ".u32", ".u64", ".u64")
    result = _assemble(compiled.ptx, 80, "sm_80", tmp_path)
    assert result.returncode == 0, result.stderr


def test_parameters_out_of_tensorrt_order_are_refused():
    with pytest.raises(AotCompileError, match="inputs, then scalars, then outputs"):
        compile_for_tensorrt(_output_before_scalar, {"x_ptr": torch.float32}, {"out_ptr": torch.float32},
                             {"BLOCK": 16})


def test_pointers_in_another_order_than_the_plugin_passes_them_are_refused():
    with pytest.raises(AotCompileError, match=r"the order \['x_ptr', 'size_ptr'"):
        swapped = dataclasses.replace(MERGE_ROWS, inputs=("size_ptr", "x_ptr", "src_ptr", "dst_ptr", "unm_ptr"))
        swapped.compile([torch.float32] * 2 + [INDEX] * 3, {"protected": 1})


def test_a_missing_compile_time_value_is_named():
    with pytest.raises(AotCompileError, match="BLOCK"):
        compile_for_tensorrt(_output_before_scalar, {"x_ptr": torch.float32}, {"out_ptr": torch.float32}, {})


PTX = """.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.u64 \t%rd1, [k_param_0];
\tld.param.u32 \t%r1, [k_param_1];
\tret;
}"""


def test_scratch_parameters_are_dropped_only_when_unused():
    metadata = SimpleNamespace(global_scratch_size=0, profile_scratch_size=0)
    ptx, types = _without_scratch_parameters(PTX, "k", 2, metadata)
    assert types == (".u64", ".u32") and "k_param_2" not in ptx and "k_param_3" not in ptx
    with pytest.raises(AotCompileError, match="global_scratch_size=64"):
        _without_scratch_parameters(PTX, "k", 2, SimpleNamespace(global_scratch_size=64, profile_scratch_size=0))
    with pytest.raises(AotCompileError, match="reads its parameter 1"):
        _without_scratch_parameters(PTX, "k", 1, metadata)
