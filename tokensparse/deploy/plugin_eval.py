"""Run an ONNX file that holds kernel plugin nodes without TensorRT: onnx's reference evaluator runs the
standard operators, and each plugin node is launched as TensorRT's AOT launch would launch it
(kernel_plugins.launch_like_tensorrt), on the CPU under TRITON_INTERPRET=1 or on a GPU."""

from __future__ import annotations

import numpy as np
import torch

from tokensparse.deploy.kernel_plugins import KERNEL_PLUGINS, launch_like_tensorrt
from tokensparse.deploy.plugin_nodes import DOMAIN


def _plugin_op(plugin, device: str):
    from onnx.reference.op_run import OpRun

    def _run(self, *inputs, **attributes):
        tensors = [torch.from_numpy(np.ascontiguousarray(array)).to(device) for array in inputs]
        attributes = {name: value for name, value in attributes.items() if not name.startswith("plugin_")}
        return tuple(tensor.cpu().numpy() for tensor in launch_like_tensorrt(plugin, tensors, attributes))

    return type(plugin.name, (OpRun,), {"op_domain": DOMAIN.domain, "_run": _run})


def _gather_elements():
    """GatherElements by take_along_axis: onnx's own reference (numpy.choose) takes at most 64 elements on the
    gathered axis."""
    from onnx.reference.op_run import OpRun

    def _run(self, data, indices, axis=0):
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)

    return type("GatherElements", (OpRun,), {"op_domain": "", "_run": _run})


def run_with_kernel_plugins(model, feeds: dict, device: str = "cpu") -> list:
    """The outputs of `model` (an onnx ModelProto or path) on `feeds` (name -> numpy array)."""
    from onnx.reference import ReferenceEvaluator

    operators = [_plugin_op(plugin, device) for plugin in KERNEL_PLUGINS.values()] + [_gather_elements()]
    return ReferenceEvaluator(model, new_ops=operators).run(None, feeds)
