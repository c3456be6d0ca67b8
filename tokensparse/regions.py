"""Regional compilation: split a rewritten graph at its transformer blocks and compile each distinct
block once, reused by every block of the same structure (compile time stops growing with depth).

Blocks after a token cut see a data-dependent (unbacked) token count, so a block compiled for one of
them is size-generic: Inductor binds the count from the input's shape at run time and cannot
specialise on it. Blocks are shared only when their graphs are identical node for node and their inputs
agree in dtype, device, rank, every static or backed-symbolic size and stride, and the pattern of their
unbacked sizes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch.utils._sympy.symbol import SymT, symbol_is_type

from tokensparse.patterns.blocks import Block

log = logging.getLogger("tokensparse")

# compile_region(graph_module, example_inputs) -> callable taking the inputs positionally
RegionCompiler = Callable[[fx.GraphModule, list], Callable]


@dataclass
class RegionPlan:
    """The split graph and its regions grouped by structure (one compile per group)."""

    split: fx.GraphModule
    groups: list[list[str]]          # submodule names; the first of each group is compiled

    @property
    def regions(self) -> int:
        return sum(len(group) for group in self.groups)


class CompiledRegion(torch.nn.Module):
    """Stands in the split graph for one region; calls the group's compiled function."""

    def __init__(self, compiled: Callable, name: str):
        super().__init__()
        self.compiled = compiled
        self.name = name

    def forward(self, *args):
        return self.compiled(*args)


def split_at_blocks(gm: fx.GraphModule, blocks: list[Block]) -> fx.GraphModule:
    """Cut the graph into [before the blocks, block 0, ..., block n-1, after the blocks] by position."""
    order = {node: position for position, node in enumerate(gm.graph.nodes)}
    computed = [[order[n] for n in block.nodes if n in order and n.op not in ("placeholder", "get_attr")]
                for block in blocks]
    if any(not positions for positions in computed):
        raise ValueError("a block holds no computation in the rewritten graph")
    starts = [min(positions) for positions in computed]
    end = max(computed[-1])
    if starts != sorted(starts):
        raise ValueError("blocks are interleaved in the graph")

    def region_of(node: fx.Node) -> int:
        position = order[node]
        if position > end:
            return len(blocks) + 1
        return sum(1 for start in starts if position >= start)

    # split_module threads every symbol of an input's dynamo example_value as an extra input, and has no
    # binding for the unbacked token counts our ops create; the regions get them from their inputs' shapes.
    for node in gm.graph.nodes:
        node.meta.pop("example_value", None)
    return split_module(gm, None, region_of, keep_original_order=True)


def region_signature(region: fx.GraphModule) -> tuple:
    """Node-for-node structure plus input layouts. Unbacked sizes compare by pattern (renamed in order of
    appearance, so a region that reads one count from two inputs matches only regions that do the same);
    every other size, static or backed-symbolic, must be equal."""
    index: dict = {}
    unbacked: dict = {}
    signature = []
    for position, node in enumerate(region.graph.nodes):
        index[node] = position
        if node.op == "placeholder":
            signature.append(("input", _layout(node.meta.get("val"), unbacked)))
            continue
        args = fx.node.map_arg((node.args, node.kwargs), lambda used: ("node", index[used]))
        signature.append((node.op, _target_key(region, node), repr(args)))
    return tuple(signature)


def _target_key(region: fx.GraphModule, node: fx.Node):
    if node.op in ("get_attr", "call_module"):
        return ("attribute", node.target, id(getattr(region, node.target, None)))
    return node.target if isinstance(node.target, str) else f"{node.target.__module__}.{node.target!r}"


def _layout(value, unbacked: dict):
    if isinstance(value, torch.Tensor):
        def sizes(values):
            return tuple(_size_key(v, unbacked) for v in values)
        return ("tensor", value.dtype, value.device, sizes(value.shape), sizes(value.stride()))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("symbolic", type(value).__name__, _size_key(value, unbacked))
    return ("value", repr(value))


def _size_key(size, unbacked: dict):
    if not isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return size
    expr = size.node.expr
    renames = {}
    for symbol in sorted(expr.free_symbols, key=str):
        if symbol_is_type(symbol, (SymT.UNBACKED_INT, SymT.UNBACKED_FLOAT)):
            renames[symbol] = unbacked.setdefault(symbol, sympy.Symbol(f"unbacked{len(unbacked)}"))
    return str(expr.xreplace(renames))


def plan_regions(gm: fx.GraphModule, blocks: list[Block]) -> RegionPlan:
    """Split at the blocks and group regions with equal signatures, in graph order."""
    split = split_at_blocks(gm, blocks)
    groups: dict[tuple, list[str]] = {}
    for node in split.graph.nodes:
        if node.op == "call_module":
            groups.setdefault(region_signature(getattr(split, node.target)), []).append(node.target)
    return RegionPlan(split, list(groups.values()))


def compile_regions(plan: RegionPlan, compile_region: RegionCompiler) -> fx.GraphModule:
    """Compile the first region of each group and install it for the whole group."""
    for group in plan.groups:
        first = getattr(plan.split, group[0])
        inputs = [node.meta["val"] for node in first.graph.nodes if node.op == "placeholder"]
        compiled = compile_region(first, inputs)
        for name in group:
            setattr(plan.split, name, CompiledRegion(compiled, name))
    log.info("tokensparse: %d regions compiled as %d", plan.regions, len(plan.groups))
    return plan.split
