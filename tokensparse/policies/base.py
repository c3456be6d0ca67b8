"""Shared pieces of the policies: the Policy base class, option checks, and the selection recorder."""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional


class Policy:
    """A token-reduction method: a frozen dataclass of options plus plain-PyTorch step functions."""

    name = "policy"
    stage = "vision"        # where it acts: "vision" (a vision encoder's blocks), "llm" or "kv"

    def __init_subclass__(cls, **kwargs):
        # Every policy's boolean options are checked before its own __post_init__ runs ("no" is not False).
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None and hasattr(cls, "__post_init__"):
            return                                   # inherited: already checks

        def __post_init__(self):
            check_flags(self)
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__

    sizes_bias_attention = False     # whether the attention after a step adds log(size) of its keys (ToMe)

    def check_depth(self, depth: int) -> None:
        """ValueError where an option names a block past the model's `depth`."""

    def tower_step(self, index: int, depth: int, tokens: int, prefix: int):
        """The token step after block `index` (of `depth`) of a vision encoder whose stream holds `tokens` tokens,
        the first `prefix` of them protected: a tower_step.TowerStep, or None where it takes none. Only
        vision-encoder policies (Config(vision=...)) take one."""
        return None

    def options(self) -> dict:
        from dataclasses import asdict

        return {"policy": self.name, **asdict(self)}


def check_flags(policy) -> None:
    """Each dataclass field annotated bool holds True or False."""
    import dataclasses

    for field in dataclasses.fields(policy):
        value = getattr(policy, field.name)
        if field.type in (bool, "bool") and not isinstance(value, bool):
            raise ValueError(f"{field.name}={value!r} must be True or False")


def check_int_at_least(option: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{option}={value!r} must be an integer >= {low}")
    if value < low:
        raise ValueError(f"{option}={value!r} is out of range: it must be an integer >= {low}")


def checked_layers(option: str, layers, low: int, what: str = "layer") -> tuple:
    """One int or a sequence of distinct ints >= low, as a sorted tuple."""
    if isinstance(layers, (list, tuple, range)):
        layers = tuple(layers)
    elif isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = (layers,)
    else:
        raise ValueError(f"{option}={layers!r} must be one {what} (an int) or a list of them")
    if not layers:
        raise ValueError(f"{option}=() is empty: name at least one {what}")
    for layer in layers:
        check_int_at_least(option, layer, low)
    if len(set(layers)) != len(layers):
        raise ValueError(f"{option}={list(layers)} repeats a {what}")
    return tuple(sorted(layers))


def check_fraction(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{option}={value!r} must be a number in (0, 1]")
    if not 0 < value <= 1:
        raise ValueError(f"{option}={value!r} is out of range: it must be in (0, 1]")


class SelectionRecorder:
    """Collects each eager policy step's selection (for explain()'s pictures); off unless recording."""

    def __init__(self):
        self.active: Optional[list] = None

    @contextlib.contextmanager
    def recording(self):
        self.active = []
        try:
            yield self.active
        finally:
            self.active = None

    def add(self, *entry) -> None:
        if self.active is not None:
            self.active.append(entry)


recorder = SelectionRecorder()
