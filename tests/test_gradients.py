"""Token policies under autograd: the selections carry no gradient, the merges, gathers and scatters do. The
compiled model's gradients equal the eager reference's (ToMe and PyramidDrop are trained with)."""

import pytest
import torch

import tokensparse
from tests.models import build, build_llava
from tokensparse.policies.tome import tome_step
from tokensparse.policies.topk import topk_step
from tokensparse.reference import reference_forward


def test_tome_step_gradcheck():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    size = (torch.rand(2, 9, 1, dtype=torch.float64, generator=generator) + 1).requires_grad_()
    keys = torch.randn(2, 2, 9, 4, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda x, size: tome_step(x, size, keys, 3, 1), (x, size))


@pytest.mark.parametrize("fuse", [False, True])
def test_topk_step_gradcheck(fuse):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    q, k = (torch.randn(2, 2, 9, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x: topk_step(x, q, k, 0.5, 4, 1, fuse), (x,))


def _parameter_gradients(model, loss_of) -> dict:
    model.zero_grad()
    loss_of().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def assert_same_gradients(got: dict, want: dict, floor: float = 1e-6):
    """Every parameter the reference trains gets the same gradient (gradients that are zero in exact arithmetic,
    such as a key bias under softmax, compare by size only)."""
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for name, grad in want.items():
        if grad.norm() > floor:
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)
        else:
            assert got[name].norm() <= 10 * floor, name


@pytest.mark.parametrize("options, policy", [
    ({"policy": "tome", "r": 4}, tokensparse.ToMe(r=4)),
    ({"policy": "topk", "layers": (1,), "keep": 0.5, "fuse": True}, tokensparse.TopK(layers=(1,), keep=0.5, fuse=True)),
])
def test_vision_policy_gradients_equal_the_reference(options, policy):
    model, pixels = build("timm_vit", depth=3)
    fast = torch.compile(model, backend="tokensparse", options={**options, "inductor": False})
    got = _parameter_gradients(model, lambda: fast(pixels).square().sum())
    want = _parameter_gradients(model, lambda: reference_forward(model, pixels, policy)["logits"].square().sum())
    assert_same_gradients(got, want)


@pytest.fixture(scope="module")
def llava():
    return build_llava()


@pytest.mark.parametrize("policy", [tokensparse.FastV(layer=2, keep=0.5), tokensparse.PyramidDrop(layers=(1, 2), ratio=0.5),
                                    tokensparse.DivPrune(keep=0.5), tokensparse.VisualExit(layer=2),
                                    tokensparse.VisionZip(dominant=6, contextual=2)], ids=lambda policy: policy.name)
def test_language_model_policy_gradients_equal_the_masking_reference(llava, policy):
    from tokensparse.reference.llava import _applied

    model, inputs = llava
    fast = tokensparse.compile(model, tokensparse.Config(llm=policy, inductor=False))
    got = _parameter_gradients(model, lambda: fast(**inputs).logits[:, -1].square().sum())

    def reference_loss():
        with _applied(model, inputs, policy):
            return model(**inputs).logits[:, -1].square().sum()

    assert_same_gradients(got, _parameter_gradients(model, reference_loss))
