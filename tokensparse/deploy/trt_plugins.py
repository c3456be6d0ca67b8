"""TensorRT plugins for the plugin nodes that to_onnx writes, through TensorRT's Python plugin API
(tensorrt.plugin). Import-guarded: without TensorRT, register_plugins() raises an error naming what is
missing.
- The step plugins (plugins="step": TomeMerge, TopKPrune): shape descriptors, and implementations that run
  the tokensparse:: ops on TensorRT's CUDA stream from Python.
- The kernel plugins (plugins="kernel": TomeMergeRows, TopKSelect, TopKSplit): shape descriptors, the I/O
  types they run in (trtp.autotune), and ahead-of-time implementations only (trtp.aot_impl): the Triton
  kernel's PTX for the chosen types, its launch grid and its int32 scalars as expressions of the shapes
  (kernel_plugins.py). TensorRT puts the PTX in the engine and launches it itself, so the engine runs from
  C++ (trtexec, the C++ runtime, Triton Inference Server) without Python."""

# No `from __future__ import annotations`: tensorrt.plugin reads the annotations as classes (TensorDesc, int)
# to tell tensors from attributes, and strings would not do.
import importlib.util
from typing import Tuple, Union

from tokensparse.deploy.plugin_nodes import (MERGE_ROWS_PLUGIN, PLUGIN_NAMESPACE, TOME_MERGE_PLUGIN,
                                             TOPK_PRUNE_PLUGIN, TOPK_SELECT_PLUGIN, TOPK_SPLIT_PLUGIN)
from tokensparse.deploy.trt_aot import DEFAULT_ARCH


def tome_merge_tokens(tokens: int, r: int) -> int:
    """Tokens after a TomeMerge node: the pass has already capped r."""
    return tokens - r


def topk_prune_tokens(keep: int, protected: int, fuse: int) -> int:
    """Tokens after a TopKPrune node."""
    return protected + keep + int(fuse)


def register_plugins(arch: int = DEFAULT_ARCH) -> list[str]:
    """Register every plugin with TensorRT's plugin registry (the kernel plugins' PTX for GPUs of compute
    capability `arch` and later, e.g. 80 for sm_80); returns their qualified names."""
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeError("TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU); "
                           "the plugin nodes cannot be registered here")
    return _register_step_plugins() + _register_kernel_plugins(arch)


def _register_step_plugins() -> list[str]:
    import numpy as np
    import tensorrt.plugin as trtp
    import torch

    tome_name, topk_name = f"{PLUGIN_NAMESPACE}::{TOME_MERGE_PLUGIN}", f"{PLUGIN_NAMESPACE}::{TOPK_PRUNE_PLUGIN}"

    @trtp.register(tome_name)
    def tome_merge_desc(x: trtp.TensorDesc, size: trtp.TensorDesc, keys: trtp.TensorDesc, r: int,
                        protected: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        merged = x.like()
        merged.shape_expr[1] = tome_merge_tokens(x.shape_expr[1], r)
        merged_size = size.like()
        merged_size.shape_expr[1] = tome_merge_tokens(size.shape_expr[1], r)
        return merged, merged_size

    @trtp.impl(tome_name)
    def tome_merge_impl(x: trtp.Tensor, size: trtp.Tensor, keys: trtp.Tensor, r: int, protected: int,
                        outputs, stream: int):
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            merged, merged_size = torch.ops.tokensparse.tome_merge(torch.as_tensor(x, device="cuda"),
                                                                   torch.as_tensor(size, device="cuda"),
                                                                   torch.as_tensor(keys, device="cuda"), r, protected)
            torch.as_tensor(outputs[0], device="cuda").copy_(merged)
            torch.as_tensor(outputs[1], device="cuda").copy_(merged_size)

    @trtp.register(topk_name)
    def topk_prune_desc(x: trtp.TensorDesc, q: trtp.TensorDesc, k: trtp.TensorDesc, scale: float, keep: int,
                        protected: int, fuse: int) -> trtp.TensorDesc:
        kept = x.like()
        kept.shape_expr[1] = topk_prune_tokens(keep, protected, fuse)
        return kept

    @trtp.impl(topk_name)
    def topk_prune_impl(x: trtp.Tensor, q: trtp.Tensor, k: trtp.Tensor, scale: float, keep: int, protected: int,
                        fuse: int, outputs, stream: int):
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            kept = torch.ops.tokensparse.topk_prune(torch.as_tensor(x, device="cuda"), torch.as_tensor(q, device="cuda"),
                                                    torch.as_tensor(k, device="cuda"), float(np.float32(scale)), keep,
                                                    protected, bool(fuse))
            torch.as_tensor(outputs[0], device="cuda").copy_(kept)

    return [tome_name, topk_name]


def _register_kernel_plugins(arch: int) -> list[str]:
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    from tokensparse.deploy.kernel_plugins import MERGE_ROWS, TOPK_SELECT, TOPK_SPLIT

    torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                    trt.int64: torch.int64, trt.int32: torch.int32}
    trt_dtypes = {value: key for key, value in torch_dtypes.items()}

    def described(plugin, inputs, attributes):
        shapes = plugin.output_shapes([desc.shape_expr for desc in inputs], attributes)
        dtypes = plugin.output_dtypes([torch_dtypes[desc.dtype] for desc in inputs])
        return tuple(trtp.from_shape_expr(tuple(shape), dtype=trt_dtypes[dtype])
                     for shape, dtype in zip(shapes, dtypes))

    def ahead_of_time(plugin, inputs, outputs, attributes):
        compiled = plugin.compile([torch_dtypes[desc.dtype] for desc in inputs], attributes, arch)
        grid, scalars = plugin.launch([desc.shape_expr for desc in inputs], [desc.shape_expr for desc in outputs],
                                      trtp.cdiv)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = (*grid, 1, 1)[:3]
        params.block_x = compiled.threads
        params.shared_mem = compiled.shared_memory
        extra = trtp.SymIntExprs(len(scalars))
        for index, value in enumerate(scalars):
            extra[index] = trtp.SymInt32(value)
        return compiled.name, compiled.ptx, params, extra

    merge_name, select_name = f"{PLUGIN_NAMESPACE}::{MERGE_ROWS_PLUGIN}", f"{PLUGIN_NAMESPACE}::{TOPK_SELECT_PLUGIN}"
    split_name = f"{PLUGIN_NAMESPACE}::{TOPK_SPLIT_PLUGIN}"
    # What an aot_impl returns: kernel name, PTX, launch parameters, the int32 scalars (tactic: unused)
    Compiled = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    def type_choices(plugin):
        """The autotune combinations: the kernels compile for float32, float16 and bfloat16 alike, so an
        --fp16 or --bf16 engine need not cast around them."""
        return [trtp.AutoTuneCombination(plugin.io_type_choices(), "LINEAR")]

    @trtp.register(merge_name)
    def merge_rows_desc(x: trtp.TensorDesc, size: trtp.TensorDesc, src_idx: trtp.TensorDesc,
                        dst_idx: trtp.TensorDesc, unm_idx: trtp.TensorDesc,
                        protected: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return described(MERGE_ROWS, (x, size, src_idx, dst_idx, unm_idx), {"protected": protected})

    @trtp.aot_impl(merge_name)
    def merge_rows_aot(x: trtp.TensorDesc, size: trtp.TensorDesc, src_idx: trtp.TensorDesc,
                       dst_idx: trtp.TensorDesc, unm_idx: trtp.TensorDesc, protected: int,
                       outputs: Tuple[trtp.TensorDesc], tactic: int) -> Compiled:
        return ahead_of_time(MERGE_ROWS, (x, size, src_idx, dst_idx, unm_idx), outputs, {"protected": protected})

    @trtp.autotune(merge_name)
    def merge_rows_types(x: trtp.TensorDesc, size: trtp.TensorDesc, src_idx: trtp.TensorDesc,
                         dst_idx: trtp.TensorDesc, unm_idx: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
        return type_choices(MERGE_ROWS)

    def register_on_scores(name, plugin, declared):
        """TopKSelect and TopKSplit: one scores input, the attribute k, `declared` outputs."""

        @trtp.register(name)
        def desc(scores: trtp.TensorDesc, k: int) -> declared:
            outputs = described(plugin, (scores,), {"k": k})
            return outputs if len(outputs) > 1 else outputs[0]

        @trtp.aot_impl(name)
        def aot(scores: trtp.TensorDesc, k: int, outputs: Tuple[trtp.TensorDesc], tactic: int) -> Compiled:
            return ahead_of_time(plugin, (scores,), outputs, {"k": k})

        @trtp.autotune(name)
        def types(scores: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
            return type_choices(plugin)

    register_on_scores(select_name, TOPK_SELECT, trtp.TensorDesc)
    register_on_scores(split_name, TOPK_SPLIT, Tuple[trtp.TensorDesc, trtp.TensorDesc])
    return [merge_name, select_name, split_name]
