"""The sizes the policies' custom ops report while tracing (their fake/shape rules share them)."""

from __future__ import annotations

import contextlib

import torch

_symbolic_token_counts = [True]


@contextlib.contextmanager
def static_token_counts():
    """Trace the ops with static token counts (for FLOPs counting, where numbers must be concrete)."""
    _symbolic_token_counts.append(False)
    try:
        yield
    finally:
        _symbolic_token_counts.pop()


def token_count(count):
    """The output token count seen while tracing: a fresh unbacked size (at least 2, which the passes
    guarantee), so that Inductor generates one size-generic set of kernels shared by every block
    instead of one set per token count. A static count below 2 stays static."""
    if not _symbolic_token_counts[-1] or (isinstance(count, int) and count < 2):
        return count
    return torch.library.get_ctx().new_dynamic_size(min=2)


def data_dependent_count():
    """A kept length that depends on the data (image tokens, attention mass): a fresh unbacked size."""
    return torch.library.get_ctx().new_dynamic_size(min=1)


def kept_sequence_positions(mask: torch.Tensor) -> torch.Tensor:
    """The fake [B, S'] int64 positions kept from a [B, S] mask's sequence, S' depending on the data."""
    return mask.new_empty(mask.shape[0], data_dependent_count(), dtype=torch.int64)
