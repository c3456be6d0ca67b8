"""Side-by-side timing in one process: interleaved rounds, medians, compile times, FLOPs-ideal ratios."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    name: str
    compile_s: float
    samples_ms: list = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def first_call_seconds(fn: Callable, *inputs) -> float:
    """Wall time of the first call (for torch.compile'd functions: the compile)."""
    start = time.perf_counter()
    with torch.inference_mode():
        fn(*inputs)
    return time.perf_counter() - start


def time_side_by_side(variants: dict, inputs: tuple, runs: int, warmup: int = 2, progress=None) -> dict:
    """Time each variant `runs` times, interleaved round by round so that drift hits all alike."""
    timings = {name: Timing(name, compile_s) for name, (fn, compile_s) in variants.items()}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn, _ in variants.values():
                fn(*inputs)
        for _ in range(runs):
            for name, (fn, _) in variants.items():
                start = time.perf_counter()
                fn(*inputs)
                timings[name].samples_ms.append((time.perf_counter() - start) * 1e3)
            if progress is not None:
                progress()
    return timings
