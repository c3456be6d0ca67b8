"""Combining ToMe's log(size) bias with whatever mask the attention already had."""

import math

import torch

from tokensparse.fx.passes.proportional_attention import mask_with_size_bias


def test_bias_alone_and_with_masks():
    size = torch.tensor([[[1.0], [2.0], [3.0]]])
    bias = torch.tensor([0.0, math.log(2), math.log(3)]).view(1, 1, 1, 3)
    torch.testing.assert_close(mask_with_size_bias(None, size, torch.float32), bias)

    additive = torch.tensor([0.0, -1.0, -math.inf]).view(1, 1, 1, 3)
    torch.testing.assert_close(mask_with_size_bias(additive, size, torch.float32), additive + bias)

    allowed = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    combined = mask_with_size_bias(allowed, size, torch.float32)
    assert combined.dtype == torch.float32 and combined[..., 1].item() == -math.inf
    torch.testing.assert_close(combined[..., [0, 2]], bias[..., [0, 2]])


def test_biased_sdpa_equals_weighting_keys_by_size():
    """softmax(qk + log s) puts weight s_j * exp(q k_j) on key j: a merged token counts s times."""
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    size = torch.tensor([[[1.0], [2.0], [3.0]]])
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_with_size_bias(None, size, q.dtype))
    weights = (q @ k.transpose(-1, -2) / 2).exp() * size.view(1, 1, 1, 3)
    torch.testing.assert_close(got, (weights / weights.sum(-1, keepdim=True)) @ v)
