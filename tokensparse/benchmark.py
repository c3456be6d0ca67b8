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


def synchronizer(device) -> Callable[[], None]:
    """What waits for a device's queued work before a clock is read: cuda's synchronize, else nothing."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def device_description(device) -> str:
    """What the timings ran on, for tables and JSON: the GPU's name, or the CPU threads torch uses."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} threads"


def first_call_seconds(fn: Callable, *inputs, synchronize: Callable[[], None] = lambda: None) -> float:
    """Wall time of the first call (for torch.compile'd functions: the compile), its device work included."""
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        fn(*inputs)
    synchronize()
    return time.perf_counter() - start


def time_side_by_side(variants: dict, inputs: tuple, runs: int, warmup: int = 2, progress=None,
                      synchronize: Callable[[], None] = lambda: None) -> dict:
    """Time each variant `runs` times, interleaved round by round so that drift hits all alike; on a GPU,
    `synchronize` (synchronizer(device)) makes each sample the call's device time, not its launch time."""
    timings = {name: Timing(name, compile_s) for name, (fn, compile_s) in variants.items()}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn, _ in variants.values():
                fn(*inputs)
        for _ in range(runs):
            for name, (fn, _) in variants.items():
                synchronize()
                start = time.perf_counter()
                fn(*inputs)
                synchronize()
                timings[name].samples_ms.append((time.perf_counter() - start) * 1e3)
            if progress is not None:
                progress()
    return timings
