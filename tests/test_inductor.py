"""End to end under Inductor (20-40 s per compile on 2 cores): the compiled pruned model against the
eager reference."""

import warnings

import pytest
import torch

import tokensparse
from tests.conftest import main_outputs
from tests.models import build
from tokensparse import TokensparseWarning
from tokensparse.reference import reference_forward

pytestmark = pytest.mark.inductor


@pytest.mark.parametrize("family, policy", [
    ("timm_deit_distilled", tokensparse.ToMe(r=4)),
    ("hf_clip", tokensparse.TopK(layers=(1, 2), keep=0.5, fuse=True)),
    ("hf_siglip", tokensparse.ToMe(r=5, schedule="decreasing")),
], ids=["deit_tome", "clip_topk", "siglip_tome"])
def test_inductor_matches_reference(family, policy):
    model, pixels = build(family, depth=3, width=64, heads=4, batch=3)
    compiled = tokensparse.compile(model, tokensparse.Config(vision=policy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        with torch.no_grad():
            got = main_outputs(compiled(pixels))
    want = reference_forward(model, pixels, policy)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], atol=1e-4, rtol=1e-4)


def test_batch_changes_recompile_once_with_a_dynamic_batch():
    """Serving with varying batches: dynamo recompiles once with a symbolic batch, regions included."""
    model, _ = build("timm_vit", depth=3, width=32, heads=2, batch=2)
    policy = tokensparse.ToMe(r=3)
    compiled = tokensparse.compile(model, tokensparse.Config(vision=policy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        for batch in (2, 3, 5):
            pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                got = compiled(pixels)
            torch.testing.assert_close(got, reference_forward(model, pixels, policy)["logits"], atol=1e-4, rtol=1e-4)


def test_fastv_generate_under_inductor_equals_the_masking_oracle():
    """LLaVA (CLIP tower, Llama GQA): the pruned prefill graph and the decode graphs compiled by Inductor."""
    from tests.models import build_llava
    from tokensparse.reference.llava import masked_forward, masked_generate

    model, inputs = build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))
    policy = tokensparse.FastV(layer=2, keep=0.25)
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy))
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", TokensparseWarning)
        prefill = fast(**inputs).logits
        out = fast.generate(**inputs, **settings)
    want = masked_forward(model, inputs, policy)
    torch.testing.assert_close(prefill[:, -1], want["logits"][:, -1], atol=1e-5, rtol=1e-4)
    assert torch.equal(out, masked_generate(model, inputs, policy, **settings))
