"""A Triton Inference Server model repository for an exported model: config.pbtxt (inputs, outputs,
dynamic batching) checked against the official model-config protobuf, the model file, and a README."""

from __future__ import annotations

import os
import shutil
from typing import Optional

_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL"}


def _tensors(values, batched: bool) -> list[tuple[str, str, list[int]]]:
    tensors = []
    for value in values:
        kind = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
        dims = dims[1:] if batched else dims          # with max_batch_size > 0 the server owns the batch axis
        tensors.append((value.name, _TYPES.get(kind.elem_type, "TYPE_FP32"), dims))
    return tensors


def model_config(name: str, onnx_path: str, platform: str, max_batch_size: int) -> str:
    """config.pbtxt text for the ONNX model's inputs and outputs (the batch axis handled by Triton)."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    for section, values in (("input", model.graph.input), ("output", model.graph.output)):
        entries = [f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, dims))} ] }}'
                   for n, t, dims in _tensors(values, max_batch_size > 0)]
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    if max_batch_size > 0:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 100 }")
    lines.append('instance_group [ { kind: KIND_GPU count: 1 } ]' if platform == "tensorrt_plan" else
                 'instance_group [ { kind: KIND_CPU count: 1 } ]')
    return "\n".join(lines) + "\n"


def check_model_config(text: str):
    """Parse config.pbtxt with tritonclient's ModelConfig protobuf; raises ValueError naming the problem."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise ValueError(f"config.pbtxt does not parse as a Triton ModelConfig: {error}") from error


def write_model_repository(directory: str, name: str, onnx_path: str, engine_path: Optional[str] = None,
                           max_batch_size: int = 32, plugins: Optional[str] = None) -> str:
    """DIR/name/{config.pbtxt, 1/model.plan or 1/model.onnx}, plus DIR/README.md; returns config's path.
    `plugins`: the ONNX holds plugin nodes ("step" or "kernel"), which only a TensorRT engine runs."""
    if plugins and not engine_path:
        raise ValueError("the ONNX holds TensorRT plugin nodes, which ONNX Runtime cannot run: build the engine "
                         "(--engine, on a machine with TensorRT and a GPU) and write the repository there")
    platform = "tensorrt_plan" if engine_path else "onnxruntime_onnx"
    text = model_config(name, onnx_path, platform, max_batch_size)
    check_model_config(text)
    version = os.path.join(directory, name, "1")
    os.makedirs(version, exist_ok=True)
    shutil.copyfile(engine_path or onnx_path, os.path.join(version, "model.plan" if engine_path else "model.onnx"))
    config_path = os.path.join(directory, name, "config.pbtxt")
    with open(config_path, "w") as handle:
        handle.write(text)
    with open(os.path.join(directory, "README.md"), "w") as handle:
        handle.write(_README.format(name=name, platform=platform, graph=_GRAPH_NOTES[plugins]))
    return config_path


_README = """# Triton Inference Server repository written by tokensparse

Model `{name}` ({platform}). {graph}

    docker run --gpus all --rm -p8000:8000 -p8001:8001 -v $PWD:/models nvcr.io/nvidia/tritonserver:<xx.yy>-py3 \\
        tritonserver --model-repository=/models

A TensorRT engine (model.plan) must be built with the same TensorRT version as the server's image.
From C++ without a server: deserialize the plan with nvinfer1::createInferRuntime(logger)
->deserializeCudaEngine(bytes, size), create an execution context, call setInputShape() for the batch,
bind buffers with setTensorAddress(), and enqueueV3(stream).
"""

_GRAPH_NOTES = {
    None: "Token reduction is inside the model graph: standard ONNX operators (TopK, GatherElements,\n"
          "ScatterElements), so neither the server nor a client needs anything extra.",
    "kernel": "Token reduction is inside the engine: standard layers plus tokensparse's kernel plugins\n"
              "(TomeMergeRows, TopKSelect), whose ahead-of-time implementations put the Triton kernels' PTX in the\n"
              "engine. TensorRT launches them itself: the server needs no Python and no plugin library.",
    "step": "The engine holds tokensparse's step plugins (TomeMerge, TopKPrune), whose implementations run in\n"
            "Python: the server's TensorRT backend cannot run them. Export with --plugins kernel to serve.",
}
