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


# Ops that only make views or allocate: not counted as dispatched work.
_NOT_WORK = {"view", "_unsafe_view", "as_strided", "reshape", "_reshape_alias", "transpose", "permute", "expand",
             "select", "slice", "unsqueeze", "squeeze", "t", "alias", "detach", "empty", "empty_strided",
             "empty_like", "resize_", "lift_fresh", "unbind", "split", "chunk", "narrow", "contiguous",
             "set_", "_to_copy_alias", "numpy_T", "expand_as", "view_as", "split_with_sizes",
             "resolve_conj", "resolve_neg"}       # the tensor itself unless it is complex or a negative view


def eager_ops_per_forward(fn: Callable, *inputs, calls: int = 3) -> float:
    """The ops dispatched one by one per call of `fn` (torch.profiler): outermost aten ops that do work (views and
    allocations not counted) and tokensparse ops, outside compiled kernels. The CPU-side proxy for the host time
    that a GPU would spend launching them."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn(*inputs)
    counted = 0
    for event in prof.events():
        if not _is_op(event.name) or event.name.split("::", 1)[1] in _NOT_WORK:
            continue
        parent = event.cpu_parent
        while parent is not None and not _is_op(parent.name):
            parent = parent.cpu_parent
        # an aten op that another aten op called is part of that one; inside a tokensparse op each runs eagerly
        if parent is None or parent.name.startswith("tokensparse::"):
            counted += 1
    return counted / calls


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "tokensparse::"))
