"""ONNX-native passes for models exported without tokensparse: match attention and blocks with
onnxscript's pattern matcher over onnx-ir, splice in the policy's exported PyTorch code, re-derive
token-dependent sizes. The passes run in this order."""

from tokensparse.export.onnx_passes.insert_policy import insert_policy_pass
from tokensparse.export.onnx_passes.proportional_attention import proportional_attention_pass
from tokensparse.export.onnx_passes.token_sizes import token_sizes_pass

ONNX_PASSES = [insert_policy_pass, proportional_attention_pass, token_sizes_pass]

__all__ = ["ONNX_PASSES"]
