"""ToMe's own partition (Bolya et al., ICLR 2023): tokens alternate into A and B over the whole sequence, a CLS
token being A[0] and a distillation token B[0], both kept out of the matching by -inf similarity, and a
distillation token moved back to position 1. An independent implementation of that rule, against tome_step."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.policies.tome import capped_r, tome_step


def tome_over_all_tokens(x, size, keys, r, cls: bool, distill: bool):
    """ToMe's merge with the partition over every token, written from the paper's description."""
    metric = keys.mean(dim=1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if cls:
        scores[:, 0, :] = -math.inf
    if distill:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edges[:, r:].sort(dim=1).values, edges[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    width = x.shape[-1]
    weighted, sizes = x * size, size
    a, b = weighted[:, ::2], weighted[:, 1::2]
    a_size, b_size = sizes[:, ::2], sizes[:, 1::2]
    b = b.scatter_reduce(1, dst_idx.expand(-1, -1, width), a.gather(1, src_idx.expand(-1, -1, width)), "sum")
    b_size = b_size.scatter_reduce(1, dst_idx, a_size.gather(1, src_idx), "sum")
    unm, unm_size = a.gather(1, unm_idx.expand(-1, -1, width)), a_size.gather(1, unm_idx)
    if distill:
        out = torch.cat([unm[:, :1], b[:, :1], unm[:, 1:], b[:, 1:]], dim=1)
        out_size = torch.cat([unm_size[:, :1], b_size[:, :1], unm_size[:, 1:], b_size[:, 1:]], dim=1)
    else:
        out, out_size = torch.cat([unm, b], dim=1), torch.cat([unm_size, b_size], dim=1)
    return out / out_size, out_size


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(5, 40), r=st.integers(1, 20), prefix=st.sampled_from([0, 1, 2]),
       seed=st.integers(0, 2 ** 16))
def test_tome_step_follows_tomes_partition(tokens, r, prefix, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 6, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (2, tokens, 1), generator=generator).double()
    keys = torch.randn(2, 3, tokens, 4, generator=generator, dtype=torch.float64)
    r = capped_r(r, tokens, prefix)
    got_x, got_size = tome_step(x, size, keys, r, prefix)
    want_x, want_size = tome_over_all_tokens(x, size, keys, r, cls=prefix >= 1, distill=prefix == 2)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_size, want_size)
    if prefix:
        torch.testing.assert_close(got_x[:, :prefix], x[:, :prefix])       # the prefix never merges


@pytest.mark.parametrize("prefix", [3, 5])
def test_registers_are_left_out_of_the_partition(prefix):
    """ToMe defines no partition for register tokens: the patches after them start with an A token."""
    from tokensparse.policies.tome import bipartite_soft_matching, merge_tokens

    generator = torch.Generator().manual_seed(prefix)
    x, keys = torch.randn(1, 17, 4, generator=generator), torch.randn(1, 2, 17, 4, generator=generator)
    size = torch.ones(1, 17, 1)
    got = tome_step(x, size, keys, 3, prefix)
    matches = bipartite_soft_matching(keys.mean(dim=1), 3, prefix)
    want = merge_tokens(x, size, *matches, prefix)
    torch.testing.assert_close(got, want)
