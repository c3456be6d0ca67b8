"""Regional compilation: split a rewritten graph at its transformer blocks and compile each distinct
block once, reused by every block of the same structure (compile time stops growing with depth).

Blocks after a token cut see a data-dependent (unbacked) token count, so a block compiled for one of
them is size-generic: Inductor binds the count from the input's shape at run time and cannot
specialise on it. Blocks are shared only when their graphs are identical node for node and their inputs
agree in dtype, device, rank, every static or backed-symbolic size and stride, and the pattern of their
unbacked sizes. A region that returns fewer values than another (the last block, whose token sizes nothing
reads) borrows that one's compile when the other, cut down to those values, is the same graph."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable

import sympy
import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch.utils._sympy.symbol import SymT, symbol_is_type

from tokensparse.fx.patterns.blocks import Block

log = logging.getLogger("tokensparse")

# compile_region(graph_module, example_inputs) -> callable taking the inputs positionally
RegionCompiler = Callable[[fx.GraphModule, list], Callable]


@dataclass(frozen=True)
class OutputSelection:
    """Which of a lender region's outputs a borrowing region returns (`single`: one value, not a tuple)."""

    indices: tuple[int, ...]
    single: bool

    def pick(self, outputs):
        return outputs[self.indices[0]] if self.single else tuple(outputs[i] for i in self.indices)


@dataclass
class RegionPlan:
    """The split graph and its regions grouped by structure (one compile per group)."""

    split: fx.GraphModule
    groups: list[list[str]]          # submodule names; the first of each group is compiled
    # group index -> (the earlier group whose compile it runs, the outputs it keeps)
    lenders: dict[int, tuple[int, OutputSelection]] = field(default_factory=dict)

    @property
    def regions(self) -> int:
        return sum(len(group) for group in self.groups)

    @property
    def compiles(self) -> int:
        """Compiles when every region satisfies its group's guards."""
        return len(self.groups) - len(self.lenders)


class CompiledRegion(torch.nn.Module):
    """Stands in the split graph for one region; calls the group's compiled function (keeping `selection`'s
    outputs of a lender's)."""

    def __init__(self, compiled: Callable, name: str, selection: OutputSelection | None = None):
        super().__init__()
        self.compiled = compiled
        self.name = name
        self.selection = selection

    def forward(self, *args):
        outputs = self.compiled(*args)
        return outputs if self.selection is None else self.selection.pick(outputs)


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
    split = split_module(gm, None, region_of, keep_original_order=True)
    # Inside each region the values are back where AOTAutograd's cache looks for them (it bypasses, and traces
    # again, a graph whose method calls have no example value).
    for region in split.children():
        for node in region.graph.nodes:
            if "val" in node.meta:
                node.meta["example_value"] = node.meta["val"]
    return split


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
    """Split at the blocks and group regions with equal signatures, in graph order; a group whose regions
    return a subset of an earlier group's outputs borrows that group's compile."""
    split = split_at_blocks(gm, blocks)
    groups: dict[tuple, list[str]] = {}
    for node in split.graph.nodes:
        if node.op == "call_module":
            groups.setdefault(region_signature(getattr(split, node.target)), []).append(node.target)
    plan = RegionPlan(split, list(groups.values()))
    for index, group in enumerate(plan.groups):
        for earlier in range(index):
            if earlier in plan.lenders:
                continue
            selection = outputs_served_by(getattr(split, plan.groups[earlier][0]), getattr(split, group[0]))
            if selection is not None:
                plan.lenders[index] = (earlier, selection)
                break
    return plan


def _outputs(region: fx.GraphModule) -> tuple[list, bool]:
    value = region.graph.output_node().args[0]
    return (list(value), False) if isinstance(value, (tuple, list)) else ([value], True)


def outputs_served_by(lender: fx.GraphModule, region: fx.GraphModule) -> OutputSelection | None:
    """The outputs of `lender` that compute `region`, if `region` is `lender` returning fewer of its values
    (cut down to them, dead code removed, the same signature); else None."""
    lent, lent_single = _outputs(lender)
    wanted, single = _outputs(region)
    if lent_single or len(wanted) >= len(lent):
        return None
    target = region_signature(region)
    for indices in itertools.combinations(range(len(lent)), len(wanted)):
        graph = fx.Graph()
        copied = graph.graph_copy(lender.graph, {})
        kept = [copied[i] for i in indices]
        graph.output(kept[0] if single else tuple(kept))
        graph.eliminate_dead_code()
        if region_signature(fx.GraphModule(lender, graph)) == target:
            return OutputSelection(indices, single)
    return None


def compile_regions(plan: RegionPlan, compile_region: RegionCompiler) -> fx.GraphModule:
    """Compile the first region of each group and install it for the whole group (a borrowing group: its
    lender's compile, keeping the outputs it returns)."""
    compiled_groups: dict[int, Callable] = {}
    for index, group in enumerate(plan.groups):
        if index in plan.lenders:
            lender, selection = plan.lenders[index]
            compiled = compiled_groups[lender]
        else:
            first = getattr(plan.split, group[0])
            inputs = [node.meta["val"] for node in first.graph.nodes if node.op == "placeholder"]
            compiled, selection = compile_region(first, inputs), None
            compiled_groups[index] = compiled
        _install(plan, group, compiled, selection)
    log.info("tokensparse: %d regions compiled as %d", plan.regions, plan.compiles)
    return plan.split


def _install(plan: RegionPlan, names: list[str], compiled: Callable, selection: OutputSelection | None = None):
    """`compiled` stands in the split graph for each region of `names`."""
    for name in names:
        setattr(plan.split, name, CompiledRegion(compiled, name, selection))


def region_inputs(plan: RegionPlan, inputs: list, fake_mode) -> dict[str, list]:
    """Each region's inputs as the split graph passes them, from one FakeTensor run of the whole split graph in
    which the policy steps give their token counts as numbers (their PyTorch functions, inline_steps.py)."""
    from tokensparse.fx.passes.fake import fake_propagation

    recorded: dict[str, list] = {}

    class Recorder(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            recorded[target] = list(args)
            return super().call_module(target, args, kwargs)

    with fake_propagation(fake_mode):
        Recorder(plan.split).run(*inputs)
    return recorded


@dataclass
class SymbolicInputs:
    """A region's example inputs whose symbolic sizes (token counts, a dynamic batch) are backed symbols of a
    fresh shape environment, each with one region's value as its hint."""

    fake_mode: object
    inputs: list
    symbols: dict          # sympy symbol -> (input index, dim or None for a SymInt input)

    def values_of(self, concrete: list) -> dict | None:
        """The symbols' values for another region of the group (its inputs `concrete`), None if they disagree."""
        values: dict = {}
        for symbol, (index, dim) in self.symbols.items():
            value = concrete[index].shape[dim] if dim is not None else concrete[index]
            value = _hint(value)
            if values.setdefault(symbol, value) != value:
                return None
        return values

    def holds_for(self, concrete: list) -> bool:
        """Whether every guard the compile recorded holds for a region with inputs `concrete`, so the compiled
        code (which reads its sizes from its inputs) computes that region too."""
        values = self.values_of(concrete)
        if values is None:
            return False
        shape_env = self.fake_mode.shape_env
        checks = [guard.expr for guard in shape_env.guards]
        checks += [sympy.Eq(symbol, replacement) for symbol, replacement in shape_env.replacements.items()]
        checks += [assertion.expr for assertions in shape_env.deferred_runtime_asserts.values()
                   for assertion in assertions]
        return all(_is_true(check.xreplace(values)) for check in checks)


def symbolic_inputs(template: list, concrete: list) -> SymbolicInputs:
    """Inputs like `concrete` (one region's), whose sizes that are symbolic in `template` (the placeholders'
    values of the symbolic rewrite: unbacked token counts, dynamo's symbols) are fresh backed symbols."""
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv(duck_shape=False)
    fake_mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    inputs, symbols = [], {}
    for index, (shape_like, value) in enumerate(zip(template, concrete)):
        source = LocalSource(f"region_input_{index}")
        if isinstance(value, torch.Tensor):
            sizes = [_hint(size) for size in value.shape]
            traced = shape_like.shape if isinstance(shape_like, torch.Tensor) else sizes
            dynamic = [DimDynamic.STATIC if isinstance(size, int) else DimDynamic.DYNAMIC for size in traced]
            real = torch.empty_strided(sizes, [_hint(stride) for stride in value.stride()], dtype=value.dtype,
                                       device=value.device, requires_grad=value.requires_grad)
            context = StatelessSymbolicContext(dynamic_sizes=dynamic, constraint_sizes=[None] * len(sizes))
            fake = fake_mode.from_tensor(real, source=source, symbolic_context=context)
            for dim, size in enumerate(fake.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    symbols[size.node.expr] = (index, dim)
            inputs.append(fake)
        elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) and \
                isinstance(shape_like, torch.SymInt):
            hint = _hint(value)
            symbol = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
            symbols[symbol] = (index, None)
            inputs.append(shape_env.create_symintnode(symbol, hint=hint, source=source))
        else:
            inputs.append(value)
    return SymbolicInputs(fake_mode, inputs, symbols)


def compile_regions_symbolically(plan: RegionPlan, compile_region: Callable, inputs: list, fake_mode) -> fx.GraphModule:
    """Compile each group once, its token counts as backed symbols (compile_region(region, SymbolicInputs)), and
    install it for every region of the group whose sizes satisfy the compile's guards; a region that does not is
    compiled on its own."""
    concrete = region_inputs(plan, inputs, fake_mode)
    compiled_count = 0
    first_compiles: dict[int, tuple[Callable, SymbolicInputs]] = {}
    for index, group in enumerate(plan.groups):
        pending = list(group)
        if index in plan.lenders:
            lender, selection = plan.lenders[index]
            compiled, symbolic = first_compiles[lender]
            served = [name for name in pending if symbolic.holds_for(concrete[name])]
            _install(plan, served, compiled, selection)
            pending = [name for name in pending if name not in served]
        while pending:
            first = getattr(plan.split, pending[0])
            template = [node.meta.get("val") for node in first.graph.nodes if node.op == "placeholder"]
            symbolic = symbolic_inputs(template, concrete[pending[0]])
            compiled = compile_region(first, symbolic)
            compiled_count += 1
            first_compiles.setdefault(index, (compiled, symbolic))
            served = [name for name in pending if name == pending[0] or symbolic.holds_for(concrete[name])]
            _install(plan, served, compiled)
            pending = [name for name in pending if name not in served]
    log.info("tokensparse: %d regions compiled as %d", plan.regions, compiled_count)
    plan.split.recompile()
    return plan.split


def _hint(value):
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

    return guarding_hint_or_throw(value) if isinstance(value, torch.SymInt) else value


def _is_true(expr) -> bool:
    return expr is sympy.true or (isinstance(expr, (bool, sympy.logic.boolalg.BooleanAtom)) and bool(expr))
