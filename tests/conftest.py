"""Shared fixtures: a fresh dynamo cache per test (every test compiles new model instances)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


def run_eager_backend(model, pixel_values, options):
    """torch.compile with the tokensparse backend, Inductor off: the rewritten graph runs eagerly."""
    compiled = torch.compile(model, backend="tokensparse", options={**options, "inductor": False})
    with torch.no_grad():
        return compiled(pixel_values)


def main_outputs(output) -> dict:
    """The tensors to compare, keyed like tokensparse.reference.reference_forward's result."""
    if isinstance(output, torch.Tensor):
        return {"logits": output}
    return {"last_hidden_state": output.last_hidden_state, "pooler_output": output.pooler_output}
