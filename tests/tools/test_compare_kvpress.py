"""tools/compare_kvpress.py's own logic, without kvpress: recovering kept positions from a press's gathered
keys, and the agreement figures. (The comparison itself needs kvpress's environment: see the tool.)"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from compare_kvpress import agreement  # noqa: E402
from kvpress_worker import kept_positions  # noqa: E402


def test_kept_positions_are_recovered_from_keys_gathered_in_any_order():
    keys = torch.randn(2, 3, 20, 8, generator=torch.Generator().manual_seed(0))
    chosen = torch.stack([torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(b * 3 + h))[:7]
                                       for h in range(3)]) for b in range(2)])          # [2, 3, 7], unsorted
    kept = kept_positions(keys, keys.gather(2, chosen[..., None].expand(-1, -1, -1, 8)))
    want = torch.zeros(2, 3, 20, dtype=torch.bool).scatter(2, chosen, True)
    assert torch.equal(kept, want)


def test_changed_keys_are_refused():
    keys = torch.randn(1, 1, 10, 4)
    with pytest.raises(RuntimeError, match="changed the keys"):
        kept_positions(keys, torch.zeros(1, 1, 3, 4))


def test_agreement_counts_shared_positions_and_equal_sets():
    theirs = [torch.tensor([[[1, 1, 0, 0], [1, 0, 1, 0]]], dtype=torch.bool)]
    ours = [torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 1]]], dtype=torch.bool)]
    assert agreement(ours, theirs) == {"positions_agreeing": 0.75, "equal_sets": 0.5, "sets": 2}
