"""What the generate() tests share: greedy settings that log every step's logits, a generate() that fails
on any TokensparseWarning, and the comparison against the masking oracle's generate()."""

import warnings

import torch

from tokensparse import TokensparseWarning

# Greedy generate() with the logits of every step, for comparing against the masking oracle.
LOGGED = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def generate_without_warnings(fast, **kwargs):
    """fast.generate(**kwargs), failing on any TokensparseWarning (a rewrite that did not happen)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        return fast.generate(**kwargs)


def assert_equals_oracle(out, want):
    """The same greedy tokens, and every step's logits within float tolerance."""
    assert torch.equal(out.sequences, want.sequences)
    for got, expected in zip(out.logits, want.logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
