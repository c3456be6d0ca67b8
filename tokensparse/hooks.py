"""Module hooks inside rewritten blocks: dynamo traces their tensor math with the rest of the graph (checked
like it), but Python in a hook that reads `x.shape[1]` runs with the traced count, not the reduced one."""

from __future__ import annotations

import warnings

import torch


def hooked_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """The paths of `model`'s submodules that carry forward or forward-pre hooks."""
    return tuple(name for name, module in model.named_modules()
                 if module._forward_pre_hooks or module._forward_hooks)


def warn_hooks_in_rewritten_blocks(hooked: tuple[str, ...], blocks: list, first_cut: int, tokens: int) -> None:
    """One TokensparseWarning naming the hooked modules inside blocks from the first cut on."""
    from tokensparse.warn import TokensparseWarning

    paths = [block.path for block in blocks if block.index >= first_cut]
    inside = [name for name in hooked if any(name == path or name.startswith(path + ".") for path in paths)]
    if not inside:
        return
    warnings.warn(f"tokensparse: {', '.join(inside)} {'has' if len(inside) == 1 else 'have'} forward hooks inside "
                  f"blocks whose token count the policy reduces; dynamo traced the hooks' tensor math with the "
                  f"model (checked like the rest), but Python in a hook that reads x.shape[1] sees the {tokens} "
                  f"traced tokens, not the reduced count", TokensparseWarning, stacklevel=3)
