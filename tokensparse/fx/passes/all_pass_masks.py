"""Drop attention masks that let every token through. Hugging Face builds an all-true [B, 1, N, N]
mask from arange(N) under torch.export; after a cut it would have to follow the kept tokens, and
dropping it changes nothing (SDPA with an all-true or all-zero mask equals SDPA without one)."""

from __future__ import annotations

import torch
import torch.fx as fx

from tokensparse.fx.passes.context import PassContext
from tokensparse.fx.patterns.graph import set_arg

_BROADCASTS = {"expand", "expand_as", "unsqueeze", "view", "reshape", "to", "contiguous"}
_MAX_NODES = 64


def drop_all_pass_masks_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace an SDPA mask computed from constants alone, all-true or all-zero, by no mask."""
    for block in ctx.blocks:
        site = block.site
        if site.kind != "sdpa" or site.mask is None:
            continue
        source = site.mask
        while source.op in ("call_function", "call_method") and _name(source.target) in _BROADCASTS and source.args:
            source = source.args[0]
        value = constant_value(gm, source)
        if value is None:
            continue
        all_pass = bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
        if all_pass:
            set_arg(site.node, 3, "attn_mask", None)
            site.mask = None
            ctx.record("drop_all_pass_masks", f"{block.path}: its attention mask lets every token through")
    return gm


def constant_value(gm: fx.GraphModule, node: fx.Node):
    """The tensor `node` computes when it depends on no graph input (else None), evaluated eagerly."""
    env: dict = {}
    order: list = []
    pending = [node]
    while pending:
        current = pending.pop()
        if current in env or current in order:
            continue
        if current.op not in ("call_function", "call_method", "get_attr") or len(order) >= _MAX_NODES:
            return None
        order.append(current)
        pending.extend(current.all_input_nodes)
    for current in sorted(order, key=_position(gm)):
        if current.op == "get_attr":
            env[current] = _attribute(gm, current.target)
            continue
        args, kwargs = fx.node.map_arg((current.args, current.kwargs), env.__getitem__)
        if any(isinstance(a, torch.SymInt) for a in fx.node.map_aggregate((args, kwargs), lambda a: a)
               if not isinstance(a, (tuple, list, dict))):
            return None
        with torch.no_grad():
            if current.op == "call_method":
                env[current] = getattr(args[0], current.target)(*args[1:], **kwargs)
            else:
                env[current] = current.target(*args, **kwargs)
    result = env[node]
    return result if isinstance(result, torch.Tensor) else None


def _position(gm: fx.GraphModule):
    positions = {n: i for i, n in enumerate(gm.graph.nodes)}
    return positions.__getitem__


def _attribute(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _name(target) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]
