"""The eager FastV oracle: keep=1.0 equals the unmodified model; the kept set is every text token plus
the top image tokens by layer K-1's last-row attention; pruning changes the last-token logits."""

import pytest
import torch

from tests.models import build_llava
from tokensparse.reference.llava import fastv_masked_forward


@pytest.fixture(scope="module")
def llava():
    return build_llava(text_layers=4, image_tokens=16, prompt=(3, 5))


def test_keep_all_equals_the_unmodified_model(llava):
    model, inputs = llava
    with torch.no_grad():
        want = model(**inputs).logits
    got = fastv_masked_forward(model, inputs, layer=2, keep=1.0)
    assert got["kept"].shape == (2, 24)
    torch.testing.assert_close(got["logits"], want, atol=1e-5, rtol=1e-4)


def test_pruning_keeps_text_and_top_images(llava):
    model, inputs = llava
    got = fastv_masked_forward(model, inputs, layer=2, keep=0.25)
    kept = got["kept"]
    assert kept.shape == (2, 3 + 4 + 5)
    text = list(range(3)) + list(range(19, 24))
    for row in kept.tolist():
        assert set(text) <= set(row) and row == sorted(row)
    with torch.no_grad():
        full = model(**inputs).logits
    assert not torch.allclose(got["logits"][:, -1], full[:, -1])
    assert model.config._attn_implementation == "sdpa"          # restored


def test_layer_out_of_range_is_refused(llava):
    model, inputs = llava
    with pytest.raises(ValueError, match="layer 4 is out of range: fastv needs 1 <= layer < 4"):
        fastv_masked_forward(model, inputs, layer=4, keep=0.5)
