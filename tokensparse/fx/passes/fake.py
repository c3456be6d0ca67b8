"""FakeTensor plumbing shared by the passes and the backend: which fake mode, which fake inputs, and
permission for the unbacked token counts that the tokensparse:: ops create while tracing."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch


def detect_fake_mode(example_inputs):
    """Dynamo's fake mode inside a backend; outside dynamo a fresh one with a ShapeEnv."""
    from torch._guards import detect_fake_mode as detect
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return detect(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def fake_inputs(example_inputs, fake_mode) -> list:
    """Fakes of the example inputs: dynamo's own (memoised) under its mode, static shapes otherwise."""
    from torch._guards import TracingContext
    from torch._subclasses.fake_tensor import FakeTensor

    static = TracingContext.try_get() is None
    return [fake_mode.from_tensor(x, static_shapes=static) if isinstance(x, torch.Tensor)
            and not isinstance(x, FakeTensor) else x for x in example_inputs]


@contextlib.contextmanager
def allow_symbolic_token_counts(fake_mode):
    """Let `fake_mode` trace the custom ops whose token count is a fresh unbacked size (dynamo's mode
    refuses dynamic output shapes unless told otherwise)."""
    shape_env = fake_mode.shape_env
    if shape_env is None:
        yield
        return
    before = shape_env.settings
    shape_env.settings = dataclasses.replace(before, allow_dynamic_output_shape_ops=True)
    try:
        yield
    finally:
        shape_env.settings = before


@contextlib.contextmanager
def fake_propagation(fake_mode):
    """Run under `fake_mode`, allowing the fresh unbacked token counts our custom ops create; with the
    Python dispatcher on, as dynamo traces, so that meta functions of symbolic shapes (masked_scatter's
    broadcast under a dynamic sequence length) decompose as they did there."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import disable_fake_tensor_cache

    shape_env = fake_mode.shape_env
    with allow_symbolic_token_counts(fake_mode), fake_mode, enable_python_dispatcher(), \
            (shape_env.ignore_fresh_unbacked_symbols() if shape_env else contextlib.nullcontext()), \
            _quiet_meta_failures(), disable_fake_tensor_cache(fake_mode):
        yield


@contextlib.contextmanager
def _quiet_meta_failures():
    """FakeTensor logs a traceback for every shape error before raising it; the passes turn those errors
    into a fallback with its reason, so the traceback would only be noise."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)
