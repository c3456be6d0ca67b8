"""Deployment: ONNX export with token reduction built in."""

from tokensparse.export.onnx import DEFAULT_OPSET, OnnxExport, export_pruned, to_onnx

__all__ = ["DEFAULT_OPSET", "OnnxExport", "export_pruned", "to_onnx"]
