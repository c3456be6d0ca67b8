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


def assert_backend_alone_changes_nothing(model, inputs: dict, options: dict, reason: str) -> None:
    """torch.compile(model.forward, backend="tokensparse", options=options) warns with `reason` (a regex), and its
    prefill into a DynamicCache equals the unmodified model's, with the whole prompt cached."""
    import pytest
    from transformers import DynamicCache

    forward = torch.compile(model.forward, backend="tokensparse", options=options)
    with torch.no_grad(), pytest.warns(UserWarning, match=reason):
        got = forward(**inputs, past_key_values=DynamicCache(config=model.config))
    with torch.no_grad():
        want = model(**inputs, past_key_values=DynamicCache(config=model.config))
    torch.testing.assert_close(got.logits, want.logits)
    assert got.past_key_values.layers[0].keys.shape[2] == inputs["input_ids"].shape[1]


def assert_keep_all_equals_the_model(model, inputs: dict, **settings) -> None:
    """tokensparse.compile with FastV(keep=1.0) (nothing to prune): generate() bit-equal to the unmodified model's,
    tokens and every step's logits, without a warning."""
    import tokensparse

    fast = tokensparse.compile(model, tokensparse.Config(llm=tokensparse.FastV(layer=2, keep=1.0), inductor=False))
    out = generate_without_warnings(fast, **inputs, **settings)
    with torch.no_grad():
        want = model.generate(**inputs, **settings)
    assert torch.equal(out.sequences, want.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(want.logits))
