"""One top-k-in-order rule on every path: the k largest scores, ties to the lower index, ascending. Eager,
Inductor, the ONNX export (ONNX Runtime), the ops plugins="kernel" exports, the kernels' reference and the
Triton kernel (Triton's interpreter on CPU, or a GPU: tests/devices.py)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.devices import KERNEL_DEVICE
from tokensparse.policies.selection import rank_order, split_in_order, top_k_in_order

K = 7
# Rows of exact ties: all equal, a repeated pattern, a few distinct values, -0 beside +0, NaN (above +inf).
TIES = torch.tensor([
    [0.5] * 20,
    [1.0, 0.0] * 10,
    [2.0, 1.0, 2.0, 3.0, 1.0] * 4,
    [0.0, -0.0] * 8 + [-1.0, -0.0, 0.0, -1.0],
    [1.0, math.nan, math.inf, 1.0, math.nan] + [1.0] * 15,
])


def expected(row: list, k: int) -> list:
    """The rule written out: NaN first, then by descending value, then by index; the first k, ascending."""
    key = lambda i: (not math.isnan(row[i]), -row[i] if not math.isnan(row[i]) else 0.0, i)  # noqa: E731
    return sorted(sorted(range(len(row)), key=key)[:k])


def expected_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.tensor([expected(row, k) for row in scores.tolist()], dtype=torch.int64).reshape(-1, k)


def test_exact_ties_go_to_the_lower_index_eagerly():
    for k in (1, K, 20):
        want = expected_rows(TIES, k)
        assert torch.equal(top_k_in_order(TIES, k), want)
        kept, rest = split_in_order(TIES, k)
        assert torch.equal(kept, want)
        assert torch.equal(torch.cat([kept, rest], 1).sort(1).values, torch.arange(20).expand(len(TIES), -1))
        assert torch.equal(rest, rest.sort(1).values)
    assert torch.equal(top_k_in_order(torch.zeros(2, 3, 9), 4), torch.arange(4).expand(2, 3, 4))   # any leading dims
    assert torch.equal(rank_order(torch.zeros(1, 5)), torch.arange(5)[None])


def test_exact_ties_in_bfloat16_and_half():
    for dtype in (torch.bfloat16, torch.float16):
        scores = torch.tensor([[1.0, 1.0001, 1.0, 2.0, 1.0]]).to(dtype)      # 1.0001 rounds to 1.0
        assert torch.equal(top_k_in_order(scores, 3), torch.tensor([[0, 1, 3]]))


def test_ops_and_kernel_reference_break_ties_alike():
    """The CPU implementations of select_top_k / split_top_k (plugins="kernel") and topk_gather_reference."""
    from tokensparse.runtime.kernels import topk_gather_reference
    from tokensparse.runtime.ops import SELECT_TOP_K, SPLIT_TOP_K

    want = expected_rows(TIES, K)
    assert torch.equal(SELECT_TOP_K(TIES, K), want)
    assert torch.equal(SPLIT_TOP_K(TIES, K)[0], want)
    x = torch.arange(20.0)[None, :, None].expand(len(TIES), -1, 2)
    kept, gathered = topk_gather_reference(x, TIES, K)
    assert torch.equal(kept, want) and torch.equal(gathered[..., 0], want.float())


@pytest.mark.parametrize("block_n", [8, 1024])
def test_triton_kernel_breaks_ties_alike(block_n):
    """block_n 8: ties and the k-th largest spread over three tiles."""
    from tokensparse.runtime.kernels import topk_select, topk_split

    scores = TIES.to(KERNEL_DEVICE)
    for k in (1, K, 20):
        want = expected_rows(TIES, k)
        assert torch.equal(topk_select(scores, k, block_n=block_n).cpu(), want)
        kept, rest = topk_split(scores, k, block_n=block_n)
        assert torch.equal(kept.cpu(), want)
        assert torch.equal(rest.cpu(), split_in_order(TIES, k)[1])


def test_inductor_breaks_ties_alike():
    compiled = torch.compile(lambda s: (top_k_in_order(s, K), split_in_order(s, K)), backend="inductor",
                             fullgraph=True, dynamic=False)
    finite = TIES[:4]
    shuffled = torch.randint(0, 3, finite.shape, generator=torch.Generator().manual_seed(0)).float()
    for scores in (finite, shuffled, torch.zeros_like(finite)):
        kept, (split_kept, rest) = compiled(scores)
        assert torch.equal(kept, expected_rows(scores, K)) and torch.equal(split_kept, kept)
        assert torch.equal(rest, split_in_order(scores, K)[1])


def test_onnx_export_breaks_ties_alike():
    """torch.export -> ONNX (aten.sort.stable as TopK over the axis) run in ONNX Runtime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from tokensparse.export.translations import TRANSLATIONS

    class Select(torch.nn.Module):
        def forward(self, scores):
            return top_k_in_order(scores, K)

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Select(), (torch.randn(2, 20),), dynamic_shapes=({0: batch},), strict=False)
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=18, verbose=False,
                                     custom_translation_table=TRANSLATIONS)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    finite = TIES[:4]
    (kept,) = session.run(None, {session.get_inputs()[0].name: finite.numpy()})
    assert torch.equal(torch.from_numpy(kept), expected_rows(finite, K))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 80), keep=st.floats(0.0, 1.0),
       values=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_scores_with_forced_ties(batch, tokens, keep, values, seed):
    """Scores drawn from `values` distinct numbers (many exact ties), half the rows with a few random floats."""
    from tokensparse.runtime.kernels import topk_select

    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, values, (batch, tokens), generator=generator).float()
    noisy = torch.rand(batch, tokens, generator=generator) < 0.2
    scores = torch.where(noisy & (torch.arange(batch)[:, None] % 2 == 1),
                         torch.randn(batch, tokens, generator=generator), scores)
    k = max(1, int(keep * tokens))
    want = expected_rows(scores, k)
    assert torch.equal(top_k_in_order(scores, k), want)
    kept, rest = split_in_order(scores, k)
    assert torch.equal(kept, want)
    assert torch.equal(torch.cat([kept, rest], 1).sort(1).values, torch.arange(tokens).expand(batch, -1))
    assert torch.equal(topk_select(scores.to(KERNEL_DEVICE), k, block_n=16).cpu(), want)
