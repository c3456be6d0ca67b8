"""tokensparse: token pruning and merging for vision transformers and VLMs, as a compiler.

    torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 13})
    tokensparse.compile(model, tokensparse.Config(vision=tokensparse.ToMe(r=13)))
    print(tokensparse.explain(model, images, policy="topk", layers=[3, 6, 9], keep=0.7))
    print(tokensparse.passes())     # every pass list of both front ends (tokensparse.fx, tokensparse.onnx), in order
"""

from __future__ import annotations

from tokensparse.config import Config, config_from_options
from tokensparse.policies import (DTD, H2O, AdaptiveKV, DivPrune, FastV, KeyNorm, PyramidDrop, SnapKV, StreamingLLM, ToMe,
                                  TopK, VisionBudget, VisionZip, VisualExit)
from tokensparse.pipeline import passes
from tokensparse.report import Report, explain
from tokensparse.warn import TokensparseWarning


def compile(model, config: Config | None = None, **torch_compile_kwargs):
    """torch.compile `model` with the tokensparse backend and `config` (a Config or an options dict).
    A Hugging Face generative model comes back as a copy (same weights) whose forward is compiled, so
    that model.generate() runs the pruned prefill and decodes from the pruned KV cache."""
    import functools

    import torch

    from tokensparse.backend import tokensparse_backend
    from tokensparse.capture import ISOLATED_RECOMPILES
    from tokensparse.hooks import hooked_modules
    from tokensparse.runtime.generate import compile_for_generate
    from tokensparse.runtime.hf_model import is_generative

    config = config_from_options(config if config is not None else {})
    if is_generative(model):
        return compile_for_generate(model, config, **torch_compile_kwargs)
    # Its own recompile count: other compiled copies of the same model class must not use up dynamo's limit
    # of 8 per code object and leave this one running eagerly, unpruned.
    backend = functools.partial(tokensparse_backend, options=config, hooked=hooked_modules(model))
    return torch.compile(model, backend=backend, **{**ISOLATED_RECOMPILES, **torch_compile_kwargs})


def __getattr__(name: str):
    if name in ("ScoredCache", "ScoredStaticCache"):          # import transformers: only when asked for
        from tokensparse.runtime import scored_cache

        return getattr(scored_cache, name)
    if name in ("CountedCache", "CountedStaticCache"):
        from tokensparse.runtime import counted_cache

        return getattr(counted_cache, name)
    if name in ("PositionedCache", "PositionedScoredCache"):
        from tokensparse.runtime import positioned_cache

        return getattr(positioned_cache, name)
    raise AttributeError(f"module 'tokensparse' has no attribute {name!r}")


__all__ = ["DTD", "H2O", "AdaptiveKV", "Config", "CountedCache", "CountedStaticCache", "DivPrune", "FastV", "KeyNorm",
           "PositionedCache", "PositionedScoredCache", "PyramidDrop", "Report", "ScoredCache", "ScoredStaticCache",
           "SnapKV", "StreamingLLM", "ToMe", "TokensparseWarning", "TopK", "VisionBudget", "VisionZip", "VisualExit",
           "compile", "explain", "passes"]
