"""The policy steps as ONNX graphs, exported from the same PyTorch code the compiler and the eager
references run (one source of truth): one export per distinct step signature, cached."""

from __future__ import annotations

import functools

import onnx_ir as ir
import torch

from tokensparse.policies.tome import size_bias, tome_step
from tokensparse.policies.topk import prune_tokens, scores_from_probabilities


class ToMeStep(torch.nn.Module):
    """ToMe merge after attention, from the attention's transposed keys; sizes start at 1 when absent."""

    def __init__(self, r: int, protected: int, first: bool):
        super().__init__()
        self.r, self.protected, self.first = r, protected, first

    def forward(self, x, keys_t, size=None):
        if self.first:
            size = torch.ones_like(x[..., :1])
        return tome_step(x, size, keys_t.transpose(-1, -2), self.r, self.protected)


class SizeBias(torch.nn.Module):
    """Proportional attention's additive log-size bias [B, 1, 1, N]."""

    def forward(self, size):
        return size_bias(size)


class TopKStep(torch.nn.Module):
    """Attention-rank pruning from the attention probabilities the graph already computes."""

    def __init__(self, keep: int, protected: int, fuse: bool):
        super().__init__()
        self.keep, self.protected, self.fuse = keep, protected, fuse

    def forward(self, x, probabilities):
        scores = scores_from_probabilities(probabilities, self.protected)
        return prune_tokens(x, scores, self.keep, self.protected, self.fuse)


def _export(module: torch.nn.Module, examples: tuple, names: list[str]) -> ir.Model:
    from tokensparse.export.translations import TRANSLATIONS

    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in examples)
    program = torch.export.export(module, examples, dynamic_shapes=dynamic, strict=False)
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=18, optimize=True, verbose=False,
                                     custom_translation_table=TRANSLATIONS, input_names=names)
    return onnx_program.model


@functools.cache
def tome_graph(tokens: int, channels: int, heads: int, head_dim: int, r: int, protected: int, first: bool,
               dtype: torch.dtype = torch.float32) -> ir.Model:
    """(x [B, N, C], keys_t [B, H, d, N][, size [B, N, 1]]) -> (x', size')."""
    x = torch.randn(2, tokens, channels, dtype=dtype)
    keys_t = torch.randn(2, heads, head_dim, tokens, dtype=dtype)
    examples = (x, keys_t) if first else (x, keys_t, torch.ones(2, tokens, 1, dtype=dtype))
    names = ["x", "keys_t"] if first else ["x", "keys_t", "size"]
    return _export(ToMeStep(r, protected, first), examples, names)


@functools.cache
def size_bias_graph(tokens: int, dtype: torch.dtype = torch.float32) -> ir.Model:
    """size [B, N, 1] -> bias [B, 1, 1, N]."""
    return _export(SizeBias(), (torch.ones(2, tokens, 1, dtype=dtype),), ["size"])


@functools.cache
def topk_graph(tokens: int, channels: int, heads: int, keep: int, protected: int, fuse: bool,
               dtype: torch.dtype = torch.float32) -> ir.Model:
    """(x [B, N, C], probabilities [B, H, N, N]) -> x'."""
    x = torch.randn(2, tokens, channels, dtype=dtype)
    probabilities = torch.rand(2, heads, tokens, tokens, dtype=dtype).softmax(-1)
    return _export(TopKStep(keep, protected, fuse), (x, probabilities), ["x", "probabilities"])
