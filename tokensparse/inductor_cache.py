"""Inductor's caches for graphs that call tokensparse's own functions (the inlined policy steps, the size bias):
AOTAutograd bypasses its cache for a function it does not know, unless the function is marked cacheable with
a key. The key is a hash of tokensparse's source, so an edited tokensparse never reuses an entry."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import torch
import torch.fx as fx


@functools.cache
def source_hash() -> str:
    """sha256 of every Python file of the tokensparse package (names and contents)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tokensparse_functions(gm: fx.GraphModule) -> set[str]:
    """The qualified names of the tokensparse functions `gm` calls (submodules included; its ops are cacheable
    already)."""
    from tokensparse.runtime.ops import is_tokensparse_target

    return {f"{node.target.__module__}.{node.target.__name__}"
            for module in gm.modules() if isinstance(module, fx.GraphModule)
            for node in module.graph.nodes
            if node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload)
            and is_tokensparse_target(node.target)}


@contextlib.contextmanager
def cacheable(gm: fx.GraphModule):
    """Inductor's config, while compiling `gm`, marks the tokensparse functions it calls cacheable."""
    import torch._inductor.config as inductor_config

    marked = dict(inductor_config.unsafe_marked_cacheable_functions)
    marked.update({name: source_hash() for name in tokensparse_functions(gm)})
    with inductor_config.patch(unsafe_marked_cacheable_functions=marked):
        yield
