"""The kernel plugins (plugins="kernel"): one TensorRT plugin per Triton kernel. Each says which of its
kernel's pointer parameters are inputs and which outputs, the output shapes, and how the kernel is
launched from the shapes: the grid and the int32 scalars TensorRT passes between the inputs and the
outputs. trt_plugins.py hands this to TensorRT's AOT plugin API; launch_like_tensorrt runs the same launch
on any device Triton runs on (the CPU under TRITON_INTERPRET=1, as the tests run it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton

from tokensparse.deploy.plugin_nodes import MERGE_ROWS_PLUGIN, TOPK_SELECT_PLUGIN, TOPK_SPLIT_PLUGIN
from tokensparse.deploy.trt_aot import DEFAULT_ARCH, CompiledKernel, compile_for_tensorrt
from tokensparse.runtime.kernels.tome_merge import merge_constants, merge_launch, merge_rows
from tokensparse.runtime.kernels.topk_select import select_constants, select_launch, select_rows, split_rows


@dataclass(frozen=True)
class KernelPlugin:
    """A plugin that is one launch of `kernel`. Shapes are tuples of ints or of TensorRT shape expressions."""

    name: str
    kernel: object                      # a @triton.jit function: inputs, int32 scalars, outputs, constexprs
    inputs: tuple                       # the kernel's input pointer parameters, in the plugin's input order
    outputs: tuple                      # its output pointer parameters
    output_shapes: Callable             # (input shapes, attributes) -> output shapes
    output_dtypes: Callable             # input dtypes -> output dtypes
    launch: Callable                    # (input shapes, output shapes, cdiv) -> grid, int32 scalars
    constants: Callable                 # attributes -> the kernel's compile-time parameters
    float_inputs: tuple                 # the inputs that hold floats (the others hold int64 indices)

    def io_type_choices(self, index_dtype=torch.int64) -> str:
        """TensorRT's autotune combination of the I/O types this kernel compiles for: every float input and
        output in float32, float16 or bfloat16 together ('|': the same choice for all), indices in int64."""
        example = [torch.float32 if name in self.float_inputs else index_dtype for name in self.inputs]
        types = [*example, *self.output_dtypes(example)]
        names = {torch.float32: "FP32", torch.int64: "INT64", torch.int32: "INT32"}
        return ",".join("FP32|FP16|BF16" if dtype == torch.float32 else "|".join([names[dtype]] * 3)
                        for dtype in types)

    def compile(self, input_dtypes, attributes: dict, arch: int = DEFAULT_ARCH) -> CompiledKernel:
        """PTX for `arch`, for inputs of these dtypes."""
        return compile_for_tensorrt(self.kernel, dict(zip(self.inputs, input_dtypes)),
                                    dict(zip(self.outputs, self.output_dtypes(input_dtypes))),
                                    self.constants(attributes), arch)


MERGE_ROWS = KernelPlugin(
    MERGE_ROWS_PLUGIN, merge_rows, inputs=("x_ptr", "size_ptr", "src_ptr", "dst_ptr", "unm_ptr"),
    outputs=("out_ptr", "out_size_ptr"),
    # N - r tokens: the prefix, the A tokens left and every B token
    output_shapes=lambda shapes, attributes: [(shapes[0][0], shapes[0][1] - shapes[2][1], shapes[0][2]),
                                              (shapes[0][0], shapes[0][1] - shapes[2][1], 1)],
    output_dtypes=lambda dtypes: [dtypes[0], dtypes[1]],
    launch=lambda inputs, outputs, cdiv: merge_launch(inputs[0], inputs[2], inputs[4], outputs[0][1], cdiv),
    constants=lambda attributes: merge_constants(attributes["protected"]), float_inputs=("x_ptr", "size_ptr"))

TOPK_SELECT = KernelPlugin(
    TOPK_SELECT_PLUGIN, select_rows, inputs=("scores_ptr",), outputs=("kept_ptr",),
    output_shapes=lambda shapes, attributes: [(shapes[0][0], attributes["k"])],
    output_dtypes=lambda dtypes: [torch.int64],
    launch=lambda inputs, outputs, cdiv: select_launch(inputs[0], outputs[0][1]),
    constants=lambda attributes: select_constants(), float_inputs=("scores_ptr",))

TOPK_SPLIT = KernelPlugin(
    TOPK_SPLIT_PLUGIN, split_rows, inputs=("scores_ptr",), outputs=("kept_ptr", "rest_ptr"),
    output_shapes=lambda shapes, attributes: [(shapes[0][0], attributes["k"]),
                                              (shapes[0][0], shapes[0][1] - attributes["k"])],
    output_dtypes=lambda dtypes: [torch.int64, torch.int64],
    launch=lambda inputs, outputs, cdiv: select_launch(inputs[0], outputs[0][1]),
    constants=lambda attributes: select_constants(), float_inputs=("scores_ptr",))

KERNEL_PLUGINS = {plugin.name: plugin for plugin in (MERGE_ROWS, TOPK_SELECT, TOPK_SPLIT)}


def launch_like_tensorrt(plugin: KernelPlugin, inputs, attributes: dict) -> list:
    """Run the plugin as TensorRT's AOT launch does: outputs allocated from the declared shapes, one launch
    of the kernel with the input pointers, the int32 scalars and the output pointers, on the declared grid."""
    inputs = [tensor.contiguous() for tensor in inputs]
    shapes = [tuple(tensor.shape) for tensor in inputs]
    output_shapes = plugin.output_shapes(shapes, attributes)
    dtypes = plugin.output_dtypes([tensor.dtype for tensor in inputs])
    outputs = [torch.empty(shape, dtype=dtype, device=inputs[0].device) for shape, dtype in zip(output_shapes, dtypes)]
    grid, scalars = plugin.launch(shapes, output_shapes, triton.cdiv)
    if any(not -2**31 <= value < 2**31 for value in scalars):
        raise ValueError(f"{plugin.name}: a size does not fit the int32 scalars TensorRT passes: {scalars}")
    plugin.kernel[grid](*inputs, *scalars, *outputs, **plugin.constants(attributes))
    return outputs
