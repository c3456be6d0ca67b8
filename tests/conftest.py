"""Shared fixtures: a fresh dynamo cache per test (every test compiles new model instances)."""

import os

# The Triton kernels run in Triton's interpreter on CPU tensors (no GPU here). It must be chosen before
# anything imports triton, since triton.language's own jit helpers (tl.sort) are bound at import. The
# kernel tests use CPU tensors, so they need the interpreter on a GPU machine too.
os.environ.setdefault("TRITON_INTERPRET", "1")
# A bug inside a pass raises in the tests instead of compiling the graph unchanged with a warning.
os.environ.setdefault("TOKENSPARSE_STRICT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.fixture
def fresh_warnings(monkeypatch):
    """tokensparse's warnings forget what they said before this test (they are once per model and reason)."""
    from torch.utils.weak import WeakIdKeyDictionary

    monkeypatch.setattr("tokensparse.warn._warned", WeakIdKeyDictionary())
    monkeypatch.setattr("tokensparse.warn._warned_without_model", set())


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
