"""Models whose prompt attends both ways in places (Gemma3's image tokens inside sliding-window layers,
PaliGemma's image + text prefix): a KV policy and its evicting reference keep the model's own mask."""

import pytest
import torch

import tokensparse
from tests.models import build_gemma3, build_paligemma
from tokensparse.reference.kv import evicted_generate

GENERATE = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
FAMILIES = {"gemma3": build_gemma3, "paligemma": build_paligemma}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, inputs = FAMILIES[request.param]()
    with torch.no_grad():
        unmodified = model.generate(**inputs, **GENERATE)
    return model, inputs, unmodified


def _logits(output) -> torch.Tensor:
    return torch.stack(output.logits)


def test_reference_with_nothing_to_evict_equals_the_model(family):
    model, inputs, unmodified = family
    with torch.no_grad():
        reference, _ = evicted_generate(model, inputs, tokensparse.SnapKV(budget=1.0), **GENERATE)
    assert torch.equal(reference.sequences, unmodified.sequences)
    torch.testing.assert_close(_logits(reference), _logits(unmodified), rtol=0, atol=1e-5)


def test_nothing_to_evict_equals_the_model(family):
    """Gemma3's sliding layers: the window over positions must not erase the image's two-way attention."""
    model, inputs, unmodified = family
    fast = tokensparse.compile(model, tokensparse.Config(kv=tokensparse.SnapKV(budget=1.0), inductor=False))
    with torch.no_grad():
        got = fast.generate(**inputs, **GENERATE)
    assert torch.equal(got.sequences, unmodified.sequences)
    torch.testing.assert_close(_logits(got), _logits(unmodified), rtol=0, atol=1e-5)


def test_snapkv_equals_the_evicting_reference(family):
    """Gemma3 builds its image-block mask with vmap: the rewrite keeps dynamo's vmap level calls."""
    model, inputs, unmodified = family
    policy = tokensparse.SnapKV(budget=12, window=4)
    fast = tokensparse.compile(model, tokensparse.Config(kv=policy, inductor=False))
    with torch.no_grad():
        got = fast.generate(**inputs, **GENERATE)
        want, _ = evicted_generate(model, inputs, policy, **GENERATE)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(_logits(got), _logits(want), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(got), _logits(unmodified), atol=1e-4)      # it did evict
