"""Past dynamo's recompile limit a frame runs eagerly: a model from tokensparse.compile has its own count, and
the torch.compile path says when a rewritten frame stops being compiled."""

import warnings

import torch

import tokensparse
from tests.models import build
from tokensparse.reference import reference_forward


def test_copies_of_one_model_each_keep_pruning():
    """Four tokensparse.compile copies of one ViT, three batch sizes: 12 compiles of one code object, past
    dynamo's limit of 8, and every call still equals the eager ToMe reference."""
    model, _ = build("timm_vit")
    rs = (2, 4, 6, 8)
    compiled = [tokensparse.compile(model, {"policy": "tome", "r": r, "inductor": False}) for r in rs]
    for batch in (2, 3, 1):
        pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        for r, fast in zip(rs, compiled):
            with torch.no_grad():
                out = fast(pixels)
                want = reference_forward(model, pixels, tokensparse.ToMe(r=r))["logits"]
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"batch {batch}, r={r}")


def test_torch_compile_path_warns_past_the_recompile_limit():
    model, pixels = build("timm_vit")
    fast = torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 2, "inductor": False},
                         dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
            torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("always")
        fast(pixels)
        fast(torch.randn(3, 3, 32, 32))
    reasons = [str(w.message) for w in caught if issubclass(w.category, tokensparse.TokensparseWarning)]
    assert any("recompile_limit (1)" in reason and "unpruned" in reason for reason in reasons), reasons


def test_no_warning_for_frames_tokensparse_did_not_compile():
    model = torch.nn.Linear(4, 4)
    fast = torch.compile(model, backend="eager", dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("always")
        fast(torch.randn(2, 4))
        fast(torch.randn(3, 4))
    assert not [w for w in caught if issubclass(w.category, tokensparse.TokensparseWarning)]
