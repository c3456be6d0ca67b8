"""TensorRT plugins for the plugin nodes that to_onnx(..., plugins=True) writes, through TensorRT's Python
plugin API (tensorrt.plugin): shape descriptors, and implementations that run the tokensparse:: ops on
TensorRT's CUDA stream (their CUDA implementations use the Triton kernels). Import-guarded: without
TensorRT, register_plugins() raises an error naming what is missing.

Not yet: ahead-of-time implementations (trtp.aot_impl), which engines need to run from C++ without
Python; the ToMe step's matching (similarities, max, sort) must become kernels first."""

from __future__ import annotations

import importlib.util

from tokensparse.export.plugin_nodes import PLUGIN_NAMESPACE, TOME_MERGE_PLUGIN, TOPK_PRUNE_PLUGIN


def tome_merge_tokens(tokens: int, r: int) -> int:
    """Tokens after a TomeMerge node: the pass has already capped r."""
    return tokens - r


def topk_prune_tokens(keep: int, protected: int, fuse: int) -> int:
    """Tokens after a TopKPrune node."""
    return protected + keep + int(fuse)


def register_plugins() -> list[str]:
    """Register the plugins with TensorRT's plugin registry; returns their qualified names."""
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeError("TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU); "
                           "the plugin nodes cannot be registered here")
    import numpy as np
    import tensorrt.plugin as trtp
    import torch

    tome_name, topk_name = f"{PLUGIN_NAMESPACE}::{TOME_MERGE_PLUGIN}", f"{PLUGIN_NAMESPACE}::{TOPK_PRUNE_PLUGIN}"

    @trtp.register(tome_name)
    def tome_merge_desc(x: trtp.TensorDesc, size: trtp.TensorDesc, keys: trtp.TensorDesc, r: int, protected: int):
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
                        protected: int, fuse: int):
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
