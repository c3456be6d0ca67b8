"""Deployment: ONNX export with token reduction built in, and ONNX-native rewrites of existing exports."""

from tokensparse.export.onnx import DEFAULT_OPSET, OnnxExport, export_pruned, to_onnx
from tokensparse.onnx.rewrite import OnnxRewrite, load_onnx, rewrite_onnx

__all__ = ["DEFAULT_OPSET", "OnnxExport", "OnnxRewrite", "export_pruned", "load_onnx", "rewrite_onnx", "to_onnx"]
