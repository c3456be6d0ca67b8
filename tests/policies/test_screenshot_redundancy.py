"""GUI-KV's temporal redundancy: the Gram-Schmidt basis against torch.linalg.qr, the residuals and the selection
against a per-sample, per-head loop that follows the paper's steps."""

import pytest
import torch

from tokensparse.policies.screenshot_redundancy import (SPAN_TOLERANCE, current_screenshot, key_subspace_residuals,
                                                        orthonormal_rows, screenshot_runs)
from tokensparse.policies.snapkv import snapkv_scores
from tokensparse.policies.vision_budget import vision_budget_keep


def _layout(length: int, runs: list[tuple[int, int]], batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for start, end in runs:
        mask[:, start:end] = True
    return mask


def test_runs_number_each_screenshot_and_the_current_one_is_the_last():
    mask = _layout(14, [(1, 4), (6, 9), (10, 13)])
    mask[1] = False
    mask[1, 2:7] = True                                        # a sample with a single screenshot
    assert screenshot_runs(mask)[0].tolist() == [0, 1, 1, 1, 0, 0, 2, 2, 2, 0, 3, 3, 3, 0]
    assert current_screenshot(mask).nonzero().tolist() == [[0, 10], [0, 11], [0, 12]] + [[1, j] for j in range(2, 7)]
    assert not current_screenshot(torch.zeros(1, 5, dtype=torch.bool)).any()


@pytest.mark.parametrize("rows, dim", [(3, 8), (8, 8), (11, 8)])
def test_gram_schmidt_spans_what_qr_spans(rows, dim):
    generator = torch.Generator().manual_seed(rows)
    vectors = torch.randn(2, 3, rows, dim, generator=generator, dtype=torch.float64)
    basis = orthonormal_rows(vectors)
    q, _ = torch.linalg.qr(vectors.transpose(-1, -2))              # [.., d, min(r, d)]
    for leading in range(1, min(rows, dim) + 1):                   # the first j rows span what QR's first j columns do
        ours = basis[..., :leading, :].transpose(-1, -2) @ basis[..., :leading, :]
        theirs = q[..., :leading] @ q[..., :leading].transpose(-1, -2)
        torch.testing.assert_close(ours, theirs)
    assert bool((basis[..., dim:, :] == 0).all())                  # past the dimension, the rows are spanned


def test_gram_schmidt_gives_zero_rows_for_spanned_and_zero_rows():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, generator=generator)
    basis = orthonormal_rows(torch.stack([a, 2 * a, torch.zeros(6), b, a - 3 * b]))
    assert [float(row.norm()) == 0 for row in basis] == [False, True, True, False, True]
    torch.testing.assert_close(basis @ basis.T, torch.diag(torch.tensor([1.0, 0, 0, 1, 0])))


def _reference_residuals(keys, current, rank):
    """Per sample and KV head, as GUI-KV states it: the reduced QR of the current screenshot's keys' transpose,
    its first `rank` columns Q, and ||k - Q Q^T k|| for every key (0 within SPAN_TOLERANCE of ||k||)."""
    out = torch.empty(keys.shape[:3])
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            own = keys[b, h, current[b]].double()
            q, _ = torch.linalg.qr(own.T)
            q = q[:, :rank]
            every = keys[b, h].double()
            residual = (every - every @ q @ q.T).norm(dim=-1)
            out[b, h] = torch.where(residual <= SPAN_TOLERANCE * every.norm(dim=-1), 0.0, residual).float()
    return out


@pytest.mark.parametrize("rank", [1, 4, 8, 32])
def test_residuals_equal_the_qr_reference(rank):
    generator = torch.Generator().manual_seed(rank)
    keys = torch.randn(2, 2, 30, 8, generator=generator)
    mask = _layout(30, [(2, 9), (11, 18), (20, 26)])
    current = current_screenshot(mask)
    torch.testing.assert_close(key_subspace_residuals(keys, current, rank), _reference_residuals(keys, current, rank),
                               atol=1e-4, rtol=1e-4)


def test_residuals_are_zero_on_the_current_screenshots_span():
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 1, 12, 8, generator=generator)
    mask = _layout(12, [(0, 3), (6, 10)], batch=1)
    keys[0, 0, 1] = 2 * keys[0, 0, 6] - keys[0, 0, 7]          # an earlier key in the span of the current's first 2
    residuals = key_subspace_residuals(keys, current_screenshot(mask), rank=2)
    assert float(residuals[0, 0, 1]) == 0 and float(residuals[0, 0, 0]) > 0.1
    assert residuals[0, 0, 6:8].tolist() == [0, 0]


def _reference_keep(q, keys, mask, vision, rank, window):
    """Kept positions per sample and head, by loops: SnapKV's scores; of the earlier screenshots' positions before
    the window, the round(evicted / vision x earlier) with the smallest residuals score below every other vision
    position; then the `vision` best vision positions, every text position and the window."""
    length = keys.shape[2]
    before = mask[:, : length - window]
    scores = snapkv_scores(q[:, :, -window:], keys, 0.35)
    current = current_screenshot(mask)
    residuals = _reference_residuals(keys, current, rank)
    kept = []
    for b in range(keys.shape[0]):
        rows = []
        vision_positions = before[b].nonzero()[:, 0].tolist()
        earlier = [j for j in vision_positions if not current[b, j]]
        dropped = int(len(vision_positions) - vision) * len(earlier) / len(vision_positions)
        dropped = int(dropped + 0.5)
        for h in range(keys.shape[1]):
            redundant = sorted(earlier, key=lambda j: (float(residuals[b, h, j]), j))[:dropped]
            score = {j: -1.0 if j in redundant else float(scores[b, h, j]) for j in vision_positions}
            best = sorted(vision_positions, key=lambda j: (-score[j], j))[:vision]
            text = [j for j in range(length - window) if not before[b, j]]
            rows.append(sorted(best + text) + list(range(length - window, length)))
        kept.append(rows)
    return torch.tensor(kept)


@pytest.mark.parametrize("seed", range(6))
def test_temporal_redundancy_keeps_what_the_loop_reference_keeps(seed):
    generator = torch.Generator().manual_seed(seed)
    runs = [[(1, 8), (10, 17), (19, 26)], [(0, 10), (12, 22)], [(3, 9), (11, 15), (16, 19), (21, 27)]][seed % 3]
    mask = _layout(30, runs)
    q, keys = torch.randn(2, 4, 30, 8, generator=generator), torch.randn(2, 2, 30, 8, generator=generator)
    vision, rank = [6, 9, 12][seed % 3], [2, 4, 32][seed // 2 % 3]
    kept = vision_budget_keep(q, keys, 0.35, mask, None, vision, 1.0, window=3, temporal_rank=rank)
    assert kept.tolist() == _reference_keep(q, keys, mask, vision, rank, window=3).tolist()


def test_redundant_history_is_evicted_before_new_content():
    """Earlier-screenshot keys that repeat the current screenshot's go first, whatever their attention."""
    generator = torch.Generator().manual_seed(1)
    q, keys = torch.randn(1, 2, 24, 8, generator=generator), torch.randn(1, 1, 24, 8, generator=generator)
    mask = _layout(24, [(2, 8), (10, 16)], batch=1)
    keys[0, 0, 2:5] = keys[0, 0, 10:13]                          # three earlier keys repeat the current screenshot's
    q[0, :, -2:] = keys[0, 0, 2:4].sum(dim=0) * 4                # and the window attends to them most
    plain = vision_budget_keep(q, keys, 0.35, mask, None, 6, 1.0, window=2)
    aware = vision_budget_keep(q, keys, 0.35, mask, None, 6, 1.0, window=2, temporal_rank=4)
    assert {2, 3}.issubset(plain[0, 0].tolist())
    assert not {2, 3, 4} & set(aware[0, 0].tolist())             # 6 of 12 evicted: 6 x 6 / 12 = 3 of the history
    assert len(aware[0, 0]) == len(plain[0, 0])


def test_a_single_screenshot_has_no_history_to_score():
    generator = torch.Generator().manual_seed(2)
    q, keys = torch.randn(2, 4, 24, 8, generator=generator), torch.randn(2, 2, 24, 8, generator=generator)
    mask = _layout(24, [(3, 15)])
    assert torch.equal(vision_budget_keep(q, keys, 0.35, mask, None, 5, 1.0, window=2, temporal_rank=8),
                       vision_budget_keep(q, keys, 0.35, mask, None, 5, 1.0, window=2))


def test_the_selection_with_temporal_redundancy_runs_in_onnx_runtime(tmp_path):
    """Standard ops only (Gram-Schmidt, not QR): torch.onnx traces vision_budget_keep with temporal_rank, and ONNX
    Runtime keeps the same positions on the traced length and on another length and layout."""
    import onnxruntime

    from tokensparse.export.translations import TRANSLATIONS

    class Keep(torch.nn.Module):
        def forward(self, q, keys, mask, hidden):
            return vision_budget_keep(q, keys, 0.35, mask, hidden, 6, 1.0, 2, alpha=0.1, temporal_rank=4)

    def inputs(length, runs, seed):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(2, 4, length, 8, generator=generator), torch.randn(2, 2, length, 8, generator=generator),
                _layout(length, runs), torch.randn(2, length, 16, generator=generator))

    traced = inputs(30, [(1, 8), (10, 17), (19, 26)], 0)
    length = torch.export.Dim("length", min=8, max=4096)
    program = torch.onnx.export(Keep(), traced, dynamo=True, custom_translation_table=TRANSLATIONS, verbose=False,
                                dynamic_shapes=({2: length}, {2: length}, {1: length}, {1: length}))
    program.save(str(tmp_path / "keep.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "keep.onnx"), providers=["CPUExecutionProvider"])
    for args in (traced, inputs(41, [(0, 10), (13, 20), (22, 30), (31, 37)], 1)):
        got = session.run(None, {value.name: arg.numpy() for value, arg in zip(session.get_inputs(), args)})[0]
        assert got.tolist() == Keep()(*args).tolist()
