"""The ONNX passes, applied in this explicit order by tokensparse.onnx.rewrite. Each is (model, ctx) -> model,
over an onnx-ir Model whose attention and blocks tokensparse.onnx.patterns matched."""

from tokensparse.onnx.passes.insert_policy import insert_policy_pass
from tokensparse.onnx.passes.proportional_attention import proportional_attention_pass
from tokensparse.onnx.passes.token_sizes import token_sizes_pass

ONNX_PASSES = (
    insert_policy_pass,           # ToMe, TopK: the policy's token step (its exported PyTorch code) after each block's
                                  # attention residual
    proportional_attention_pass,  # ToMe: + log(size) on attention logits
    token_sizes_pass,             # token-count Reshape targets and masks downstream of the cut
)

__all__ = ["ONNX_PASSES"]
