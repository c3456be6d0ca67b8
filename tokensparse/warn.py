"""tokensparse's warnings: one per model and reason, and per forward call of a compiled model only those
about the graphs that matter (a graph break's fragments without the part a policy acts on stay quiet when
another graph of the same call was rewritten)."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

UNCHANGED = "compiling the graph unchanged"


class TokensparseWarning(UserWarning):
    """tokensparse compiled a graph unchanged, or part of a config was not applied; the message says why."""


# The reasons each model was warned about: by the model that warnings_for() names (tokensparse.compile, the
# exports), else by the first parameter among the graph's inputs.
_warned = WeakIdKeyDictionary()
_warned_without_model: set = set()
_model = contextvars.ContextVar("tokensparse_warned_model", default=None)
_call = contextvars.ContextVar("tokensparse_call_warnings", default=None)


@dataclass
class _CallWarnings:
    held: list = field(default_factory=list)      # (message, owner, consequence, unmatched)
    found: bool = False


@contextlib.contextmanager
def warnings_for(model):
    """Inside, warnings count against `model` (a graph's inputs name no model under torch.export)."""
    token = _model.set(model)
    try:
        yield
    finally:
        _model.reset(token)


@contextlib.contextmanager
def warnings_per_call(model):
    """One forward call of a compiled `model`: its warnings are said at the end, without those from graphs
    where nothing a policy acts on was found (`unmatched`) if another graph of the call had it."""
    call = _CallWarnings()
    tokens = _model.set(model), _call.set(call)
    try:
        yield
    finally:
        _call.reset(tokens[1])
        _model.reset(tokens[0])
        for message, owner, consequence, unmatched in call.held:
            if not (unmatched and call.found):
                _say(message, owner, consequence)


def note_found(found: bool) -> None:
    """Whether the backend found what the policy acts on in a graph of the current call (rewritten, or matched
    with nothing to reduce): the call's unmatched fragments then need no warning."""
    call = _call.get()
    if call is not None and found:
        call.found = True


def warn_once(message: str, example_inputs=(), consequence: str = UNCHANGED, unmatched: bool = False) -> None:
    """One TokensparseWarning per model and reason: `message`, then what follows from it. `unmatched`: the
    graph holds nothing the policy acts on (no attention, no decoder layers, no vision span, no KV cache)."""
    owner = _model.get()
    if owner is None:
        owner = next((value for value in example_inputs if isinstance(value, torch.nn.Parameter)), None)
    call = _call.get()
    if call is not None:
        call.held.append((message, owner, consequence, unmatched))
    else:
        _say(message, owner, consequence)


def _say(message: str, owner, consequence: str) -> None:
    seen = _warned_without_model if owner is None else _warned.setdefault(owner, set())
    if message not in seen:
        seen.add(message)
        warnings.warn(f"tokensparse: {message}; {consequence}", TokensparseWarning, stacklevel=4)
