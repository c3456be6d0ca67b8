"""Deployment past ONNX: TensorRT engines (polygraphy), TensorRT plugins for the policy steps with their Triton
kernels compiled ahead of time to PTX, the check of an ONNX model against TensorRT's parser support, and Triton
Inference Server model repositories.

Experimental: none of this has run on TensorRT yet. TensorRT cannot be installed on the machines where it was
written, so every `import tensorrt` is guarded and what is missing is said plainly. What runs without TensorRT
is tested: the support check, the PTX compilation, the plugin kernels launched as TensorRT would launch them
(under TRITON_INTERPRET=1 on the CPU), and the server repository's config against its protobuf."""
