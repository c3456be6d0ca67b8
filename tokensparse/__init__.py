"""tokensparse: token pruning and merging for vision transformers and VLMs, as a compiler.

    torch.compile(model, backend="tokensparse", options={"policy": "tome", "r": 13})
    tokensparse.compile(model, tokensparse.Config(vision=tokensparse.ToMe(r=13)))
    print(tokensparse.explain(model, images, policy="topk", layers=[3, 6, 9], keep=0.7))
"""

from __future__ import annotations

from tokensparse.config import Config, config_from_options
from tokensparse.policies import ToMe, TopK
from tokensparse.report import Report, explain
from tokensparse.rewrite import TokensparseWarning


def compile(model, config: Config | None = None, **torch_compile_kwargs):
    """torch.compile `model` with the tokensparse backend and `config` (a Config or an options dict)."""
    import torch

    from tokensparse.backend import tokensparse_backend

    config = config_from_options(config if config is not None else {})
    return torch.compile(model, backend=tokensparse_backend, options=config, **torch_compile_kwargs)


__all__ = ["Config", "Report", "ToMe", "TopK", "TokensparseWarning", "compile", "explain"]
