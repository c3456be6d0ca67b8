"""Read-only matchers over onnx-ir graphs (onnxscript's pattern matcher): attention, and the blocks around it."""
