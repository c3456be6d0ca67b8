"""ONNX translations (onnxscript) for the aten ops that the policies use and torch.onnx lacks."""

from __future__ import annotations

import torch
from onnxscript import opset18 as op


def sort_stable(self, dim: int = -1, descending: bool = False, stable: bool = True):
    """aten.sort.stable as TopK over the whole axis: ONNX TopK breaks ties by the lower index, which is
    the stable order."""
    count = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]), axis=0)
    values, indices = op.TopK(self, count, axis=dim, largest=descending, sorted=True)
    return values, indices


TRANSLATIONS = {torch.ops.aten.sort.stable: sort_stable}
