"""The torch.compile backend named "tokensparse": rewrite the dynamo graph, then Inductor."""

from __future__ import annotations

import dataclasses
import warnings

from tokensparse.config import NO_FACTS, CallerFacts, config_from_options
from tokensparse.hooks import warn_hooks_in_rewritten_blocks
from tokensparse.inductor_cache import cacheable
from tokensparse.inline_steps import inline_policy_steps
from tokensparse.fx.passes.fake import allow_symbolic_token_counts
from tokensparse.recompile_limit import remember_frame
from tokensparse.fx.rewrite import RewriteResult, TokensparseWarning, rewrite_with_kv
from tokensparse.warn import note_found


def tokensparse_backend(gm, example_inputs, options=None, hooked: tuple = (), facts: CallerFacts = NO_FACTS, **unused):
    """torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 13}). `hooked`: the paths of
    the model's modules with forward hooks (tokensparse.compile passes them), warned about inside cut blocks.
    `facts`: what tokensparse.compile()'s forward and generate() do around the graphs (config.CallerFacts).
    The policy steps of a vision encoder enter the compiled graph as their policies' PyTorch functions
    (inline_steps.py): Inductor fuses them with the model, and autograd runs through them."""
    if options is None and unused.get("mode") is not None:
        raise ValueError(f"mode={unused['mode']!r} reached tokensparse without options (torch.compile takes one or "
                         f"the other), so no policy is set: give options={{'policy': ..., 'cudagraphs': True}} for "
                         f"what mode='reduce-overhead' does (CUDA graphs)")
    config = config_from_options(options)
    if config.policy is not None or config.kv is not None:
        remember_frame()
    if config.cudagraphs:
        return _with_cuda_graphs(gm, example_inputs, config, facts)
    if config.inductor and config.regional:
        facts = dataclasses.replace(facts, compiled_by_regions=True)
    result = rewrite_with_kv(gm, example_inputs, config, facts)
    note_found(result.changed or result.match is not None)
    if hooked and result.changed and result.context is not None and result.context.acted_blocks:
        warn_hooks_in_rewritten_blocks(hooked, result.context.blocks, min(result.context.acted_blocks),
                                       result.context.blocks[0].tokens)
    if not config.inductor:
        return inline_policy_steps(result.gm).forward
    from torch._inductor.compile_fx import compile_fx

    if not result.changed:
        return compile_fx(result.gm, example_inputs)
    vision_encoder = config.vision is not None and result.match is not None and result.context.vlm.language is None
    if config.regional and vision_encoder:
        try:
            return compile_by_regions(result, example_inputs)
        except Exception as error:  # noqa: BLE001 - any failure here has a correct fallback, said once
            _warn_regions_failed(f"{type(error).__name__}: {error}")
    inline_policy_steps(result.gm)
    with allow_symbolic_token_counts(result.context.fake_mode), cacheable(result.gm):
        return compile_fx(result.gm, example_inputs)


def _with_cuda_graphs(gm, example_inputs, config, facts: CallerFacts):
    """Static token counts (each op's fake output has its true size), the whole graph, and Inductor with
    CUDA graphs: one replay per call instead of a launch per kernel. Graphs that are not on a GPU, or that
    Inductor cannot capture, run without (Inductor says why in its log)."""
    from torch._inductor.compile_fx import compile_fx

    from tokensparse.runtime.ops import static_token_counts

    config = dataclasses.replace(config, cudagraphs=False, regional=False)
    with static_token_counts():
        result = rewrite_with_kv(gm, example_inputs, config, facts)
        note_found(result.changed or result.match is not None)
        inline_policy_steps(result.gm)
        with cacheable(result.gm):
            return compile_fx(result.gm, example_inputs, config_patches={"triton.cudagraphs": True})


def compile_by_regions(result: RewriteResult, example_inputs):
    """Inductor once per distinct block (tokensparse.regions), the policy steps inlined and the token counts
    backed symbols; returns the split graph's forward."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx

    from tokensparse.fx.passes.fake import fake_inputs
    from tokensparse.regions import compile_regions_symbolically, plan_regions

    fake_mode = result.context.fake_mode

    def compile_region(region, symbolic):
        # Each region gets its own tracing context (compile_fx keeps per-graph metadata there) over the fake
        # mode whose shape environment holds the region's symbolic sizes.
        with tracing(TracingContext(symbolic.fake_mode)), cacheable(region):
            return compile_fx(region, symbolic.inputs)

    plan = plan_regions(result.gm, result.match.blocks)
    inline_policy_steps(plan.split)
    return compile_regions_symbolically(plan, compile_region, fake_inputs(example_inputs, fake_mode),
                                        fake_mode).forward


_failures: set = set()


def _warn_regions_failed(reason: str) -> None:
    if reason not in _failures:
        _failures.add(reason)
        warnings.warn(f"tokensparse: regional compilation failed ({reason}); compiling the rewritten graph "
                      f"whole instead", TokensparseWarning, stacklevel=3)
