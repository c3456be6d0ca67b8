"""The StaticCache helpers' padding arithmetic: which slots of a layer hold a left-padded batch's padding, read
from the mask over positions that tokensparse.compile hands decode steps, against a plain count of what each
layer holds."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.runtime.static_cache import slot_causal_mask, slot_padding


def _handed_mask(pads: list[int], seen: int, width: int, additive: bool) -> torch.Tensor:
    """The decode step's [B, 1, 1, width] mask over positions (runtime/static_decode_masks.py): positions
    0..width-1, or the last `width` of the `seen` positions once they outnumber the slots; padding and positions not
    seen yet hidden."""
    first = max(0, seen - width)
    positions = torch.arange(first, first + width)
    allowed = (positions[None, :] >= torch.tensor(pads)[:, None]) & (positions[None, :] < seen)
    if not additive:
        return allowed[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None, None, :]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), width=st.integers(4, 40), additive=st.booleans())
def test_an_evicted_layer_holds_padding_only_in_the_slots_its_real_positions_leave(data, width, additive):
    """The KV policies keep every real position before any padding: a layer with `filled` slots holds
    max(0, filled - real positions seen) padding slots, first, even when the mask covers only the last
    `width` positions."""
    seen = data.draw(st.integers(2, 3 * width))
    pads = data.draw(st.lists(st.integers(0, min(seen, width) - 1), min_size=1, max_size=3))
    filled = data.draw(st.integers(1, min(seen, width)))           # this step's query sits in slot filled - 1
    got = slot_padding(torch.tensor([filled - 1]), torch.zeros(1, 1, width, 1), _handed_mask(pads, seen, width,
                                                                                             additive), True)
    for sample, pad in enumerate(pads):
        held = max(0, filled - (seen - pad))
        assert got[sample].tolist() == [slot < held for slot in range(width)]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), width=st.integers(4, 40), additive=st.booleans())
def test_a_pruned_layer_holds_every_padding_position_first(data, width, additive):
    seen = data.draw(st.integers(2, width))
    pads = data.draw(st.lists(st.integers(0, seen - 1), min_size=1, max_size=3))
    filled = data.draw(st.integers(max(pads) + 1, seen))           # pruning drops image tokens, never padding
    got = slot_padding(torch.tensor([filled - 1]), torch.zeros(1, 1, width, 1), _handed_mask(pads, seen, width,
                                                                                             additive), False)
    for sample, pad in enumerate(pads):
        assert got[sample].tolist() == [slot < pad for slot in range(width)]


def test_the_slot_mask_hides_the_padding_slots_and_those_past_each_query():
    padding = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    mask = slot_causal_mask(torch.tensor([3, 4]), torch.zeros(1, 1, 6, 1), padding)
    assert mask.shape == (2, 1, 2, 6)
    assert mask[0, 0].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert torch.equal(slot_causal_mask(torch.tensor([3]), torch.zeros(1, 1, 6, 1))[0, 0, 0],
                       torch.tensor([True] * 4 + [False] * 2))
