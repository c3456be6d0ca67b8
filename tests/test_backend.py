"""The dynamo backend: entry-point discovery, option errors, and unchanged graphs with one warning."""

import re
import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import torch

from tests.models import build
from tokensparse import TokensparseWarning


def _value_error_in(exc: BaseException):
    while exc is not None:
        if isinstance(exc, ValueError):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return None


def test_entry_point_is_registered():
    found = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert found.get("tokensparse") == "tokensparse.backend:tokensparse_backend"


def test_backend_works_without_importing_tokensparse():
    script = """
import sys, torch, transformers as T
torch.manual_seed(0)
config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)
model = T.ViTModel(config).eval()
assert "tokensparse" not in sys.modules
compiled = torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 4, "inductor": False})
with torch.no_grad():
    out = compiled(torch.randn(2, 3, 32, 32))
print(tuple(out.last_hidden_state.shape))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(2, 9, 32)")  # 17 tokens, 4 merged in each of 2 blocks


@pytest.mark.parametrize("options, message", [
    ({"policy": "nope"}, "policy='nope' is unknown"),
    ({"policy": "tome", "r": -2}, "r=-2 is out of range"),
    ({"policy": "topk", "keep": 0.0}, "keep=0.0 is out of range"),
    ({"policy": "topk", "layers": [1, 7]}, "block 7 is past the model's depth \\(3 blocks"),
    ({"policy": "tome", "prefix_tokens": 65}, "prefix_tokens=65 is out of range"),
])
def test_bad_options_raise_value_error_naming_the_option(options, message):
    model, pixels = build("timm_vit", depth=3)
    compiled = torch.compile(model, backend="tokensparse", options={**options, "inductor": False})
    with pytest.raises(Exception) as info:
        compiled(pixels)
    error = _value_error_in(info.value)
    assert error is not None, f"no ValueError in {info.value!r}"
    assert re.search(message, str(error)), str(error)


def test_mode_without_options_says_how_to_combine_them():
    """torch.compile refuses mode= with options=, so mode="reduce-overhead" arrives without a policy."""
    model, pixels = build("timm_vit", depth=3)
    compiled = torch.compile(model, backend="tokensparse", mode="reduce-overhead")
    with pytest.raises(Exception) as info:
        compiled(pixels)
    error = _value_error_in(info.value)
    assert error is not None and "'cudagraphs': True" in str(error), repr(info.value)


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.layers(x)


def test_model_without_attention_compiles_unchanged_with_one_warning():
    model = NoAttention().eval()
    x = torch.randn(3, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="tokensparse", options={"policy": "tome", "inductor": False})
            with torch.no_grad():
                out = compiled(x)
    ours = [w for w in caught if issubclass(w.category, TokensparseWarning)]
    assert len(ours) == 1
    assert "no attention found" in str(ours[0].message) and "compiling the graph unchanged" in str(ours[0].message)
    torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    with pytest.warns(TokensparseWarning, match="no attention found"):   # another model: its own warning
        torch.compile(NoAttention().eval(), backend="tokensparse", options={"policy": "tome", "inductor": False})(x)


def test_dynamic_batch_rewrite_matches_reference():
    from tests.conftest import main_outputs
    from tokensparse import ToMe
    from tokensparse.reference import reference_forward

    model, pixels = build("hf_vit", depth=3, batch=3)
    compiled = torch.compile(model, backend="tokensparse", dynamic=True,
                             options={"policy": "tome", "r": 3, "inductor": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        for batch in (3, 2):
            with torch.no_grad():
                got = main_outputs(compiled(pixels[:batch]))
            want = reference_forward(model, pixels[:batch], ToMe(r=3))
            torch.testing.assert_close(got["last_hidden_state"], want["last_hidden_state"], atol=2e-5, rtol=1e-4)
