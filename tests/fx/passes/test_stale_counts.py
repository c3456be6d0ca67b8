"""A token count that the model uses as a number after the cut (dynamo bakes it into the graph) must never
be left at the unpruned value: the rewrite falls back with the reason, in torch.compile and in to_onnx."""

import warnings

import pytest
import torch

import tokensparse
from tests.conftest import run_eager_backend
from tests.models import build

HEADS = {
    "mean_of_patches": lambda h: h[:, 1:].sum(1) / (h.shape[1] - 1),
    "float_count": lambda h: h.sum(1) / float(h.shape[1]),
    "count_filled": lambda h: h.sum(1) + h.new_full((h.shape[0], 1), h.shape[1]),
    "last_token": lambda h: h[:, h.shape[1] - 1],
    "arange_over_tokens": lambda h: (h * torch.arange(h.shape[1]).view(1, -1, 1)).sum(1),
}
POLICIES = {"tome": {"policy": "tome", "r": 4}, "topk": {"policy": "topk", "layers": (1,), "keep": 0.5}}


class CountingHead(torch.nn.Module):
    """A timm ViT's features, then a head that reads the token count as a value."""

    def __init__(self, vit, head):
        super().__init__()
        self.vit, self.head = vit, head

    def forward(self, x):
        return self.head(self.vit.forward_features(x))


@pytest.fixture(scope="module")
def vit():
    return build("timm_vit")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("head", HEADS)
def test_count_used_as_a_value_falls_back(vit, head, policy, fresh_warnings):
    model, pixels = CountingHead(vit[0], HEADS[head]), vit[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_eager_backend(model, pixels, POLICIES[policy])
    with torch.no_grad():
        assert torch.equal(out, model(pixels))
    reasons = [str(w.message) for w in caught if issubclass(w.category, tokensparse.TokensparseWarning)]
    assert reasons and any("token count" in reason for reason in reasons), reasons


def test_reason_names_the_number(vit, fresh_warnings):
    model = CountingHead(vit[0], HEADS["mean_of_patches"])
    with pytest.warns(tokensparse.TokensparseWarning, match="uses the number 64 after the cut, which is the 65 "
                                                            "traced tokens less 1 prefix token"):
        run_eager_backend(model, vit[1], POLICIES["tome"])


def test_count_read_from_the_tensor_still_prunes(vit):
    """The same head written over the tensor itself (no number baked in) is pruned and equals the eager
    reference's ToMe."""
    from tokensparse.reference import reference_forward

    model, pixels = vit
    head = CountingHead(model, lambda h: h[:, 1:].mean(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tokensparse.TokensparseWarning)
        out = run_eager_backend(head, pixels, POLICIES["tome"])
    with torch.no_grad():
        tokens = reference_forward(model, pixels, tokensparse.ToMe(r=4))["tokens"]
    assert tokens.shape[1] == 65 - 3 * 4
    torch.testing.assert_close(out, tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def test_to_onnx_falls_back(vit, tmp_path, fresh_warnings):
    from tokensparse.export.onnx import to_onnx

    model = CountingHead(vit[0], HEADS["mean_of_patches"])
    with pytest.warns(tokensparse.TokensparseWarning, match="uses the number 64"):
        export = to_onnx(model, (vit[1],), {"policy": "tome", "r": 4}, str(tmp_path / "m.onnx"))
    assert not export.changed
