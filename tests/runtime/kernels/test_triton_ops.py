"""The triton_ops and the CUDA implementations of the policy ops built on them, run on CPU tensors
under the Triton interpreter, against the ops' plain PyTorch implementations."""

import torch

import tokensparse.runtime.triton_ops as triton_ops
from tokensparse.runtime.kernels import kv_compact_reference
from tokensparse.runtime.ops import TOME_MERGE, TOPK_PRUNE


def test_cuda_kernels_are_registered():
    for name in ("tokensparse::tome_merge", "tokensparse::topk_prune"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


def test_tome_merge_triton_matches_the_op():
    generator = torch.Generator().manual_seed(0)
    x, keys = torch.randn(3, 33, 16, generator=generator), torch.randn(3, 2, 33, 8, generator=generator)
    size = torch.rand(3, 33, 1, generator=generator) + 1
    got = triton_ops.tome_merge_triton(x, size, keys, 7, 1)
    want = TOME_MERGE(x, size, keys, 7, 1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_topk_prune_triton_matches_the_op():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 29, 16, generator=generator)
    q, k = torch.randn(2, 4, 29, 8, generator=generator), torch.randn(2, 4, 29, 8, generator=generator)
    for protected, fuse in ((1, False), (0, True)):
        got = triton_ops.topk_prune_triton(x, q, k, 0.35, 11, protected, fuse)
        want = TOPK_PRUNE(x, q, k, 0.35, 11, protected, fuse)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kv_compact_op_mutates_in_place():
    generator = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 3, 20, 8, generator=generator)
    kept = torch.rand(2, 3, 20, generator=generator).argsort(-1)[..., :9].sort(-1).values
    want = kv_compact_reference(cache, kept)
    torch.ops.tokensparse.kv_compact_(cache, kept)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)
