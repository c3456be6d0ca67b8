"""The triton_ops and the CUDA implementations of the policy ops built on them, against the ops' plain
PyTorch implementations: on CPU tensors under the Triton interpreter, or on a GPU (tests/devices.py)."""

import pytest
import torch

import tokensparse.runtime.triton_ops as triton_ops
from tests.devices import KERNEL_DEVICE as DEVICE
from tokensparse.runtime.ops import TOME_MERGE, TOPK_PRUNE


def test_cuda_kernels_are_registered():
    for name in ("tokensparse::tome_merge", "tokensparse::topk_prune", "tokensparse::merge_matches",
                 "tokensparse::select_top_k", "tokensparse::split_top_k"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


def test_tome_merge_triton_matches_the_op():
    generator = torch.Generator().manual_seed(0)
    x, keys = torch.randn(3, 33, 16, generator=generator), torch.randn(3, 2, 33, 8, generator=generator)
    size = torch.rand(3, 33, 1, generator=generator) + 1
    got = triton_ops.tome_merge_triton(x.to(DEVICE), size.to(DEVICE), keys.to(DEVICE), 7, 1)
    want = TOME_MERGE(x, size, keys, 7, 1)        # CPU: the plain PyTorch implementation
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_topk_prune_triton_matches_the_op():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 29, 16, generator=generator)
    q, k = torch.randn(2, 4, 29, 8, generator=generator), torch.randn(2, 4, 29, 8, generator=generator)
    for protected, fuse in ((1, False), (0, True)):
        got = triton_ops.topk_prune_triton(x.to(DEVICE), q.to(DEVICE), k.to(DEVICE), 0.35, 11, protected, fuse)
        want = TOPK_PRUNE(x, q, k, 0.35, 11, protected, fuse)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


def _opcheck_samples():
    generator = torch.Generator().manual_seed(5)
    x, size = torch.randn(2, 13, 8, generator=generator), torch.rand(2, 13, 1, generator=generator) + 1
    src, dst, unm = (torch.tensor([[[0], [2]], [[4], [1]]]), torch.tensor([[[1], [0]], [[5], [2]]]),
                     torch.tensor([[[1], [3], [4], [5]], [[0], [2], [3], [5]]]))
    yield torch.ops.tokensparse.tome_merge_rows, (x, size, src, dst, unm, 1)
    yield torch.ops.tokensparse.topk_gather, (x, torch.randn(2, 13, generator=generator), 5)


@pytest.mark.skipif(DEVICE == "cpu", reason="opcheck runs the triton_op on FakeTensors, whose data the Triton "
                                            "interpreter reads; it runs on a GPU")
@pytest.mark.parametrize("op, args", list(_opcheck_samples()), ids=["tome_merge_rows", "topk_gather"])
def test_triton_ops_pass_opcheck(op, args):
    """Schema, fake (meta) implementation, autograd registration and torch.compile tracing of each
    triton_op."""
    args = tuple(arg.to(DEVICE) if isinstance(arg, torch.Tensor) else arg for arg in args)
    torch.library.opcheck(op, args)
