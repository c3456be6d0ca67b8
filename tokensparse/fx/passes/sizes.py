"""Re-derive token-dependent sizes downstream of a cut: static graphs bake the token count into
reshape/view/expand literals (197 appears in every attention of a ViT-B/16)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import torch
import torch.fx as fx

from tokensparse.fx.passes.context import STANDS_FOR, PassContext
from tokensparse.fx.passes.fake import fake_propagation
from tokensparse.fx.patterns.graph import module_paths, op_name, shape_of
from tokensparse.pipeline import MatchFailure

# Ops whose arguments after the input tensor spell a shape, and whether numel must be preserved.
_SHAPE_OPS = {"reshape": True, "view": True, "_unsafe_view": True, "expand": False}


class _SizeRederiver(fx.Interpreter):
    """Runs the graph on fake tensors; before each shape op whose input changed, rewrites the literal
    sizes from the input's old and new shapes, then stores the fresh value in the node's meta."""

    def __init__(self, gm: fx.GraphModule, old_shapes: dict, tokens=None):
        super().__init__(gm)
        self.old_shapes = old_shapes
        self.tokens = tokens            # the traced token count entering the first block or decoder layer
        self.patched: list[str] = []

    def run_node(self, node: fx.Node):
        if op_name(node) in _SHAPE_OPS and node.args and isinstance(node.args[0], fx.Node):
            self._patch(node)
        try:
            result = super().run_node(node)
        except Exception as error:  # any fake-tensor failure means the rewrite is not consistent
            said = str(error).splitlines()[0]
            raise MatchFailure(f"shapes do not agree after the rewrite at {node.name} ({op_name(node)}): "
                               f"{type(error).__name__}: {said}{self._stale_hint(said)}") from error
        if node.op != "output":
            node.meta["val"] = result
            if "example_value" in node.meta:
                node.meta["example_value"] = result
        return result

    def _stale_hint(self, said: str) -> str:
        """Where a failure names the traced token count: what it most likely means."""
        if not isinstance(self.tokens, int) or not re.search(rf"\b{self.tokens}\b", said):
            return ""
        return (f" (a tensor sized for the original tokens, {self.tokens}, such as a mask computed before the cut, "
                f"meets the reduced tokens)")

    def _patch(self, node: fx.Node) -> None:
        source = node.args[0]
        old_in = self.old_shapes.get(source) or self.old_shapes.get(source.meta.get(STANDS_FOR))
        old_out = self.old_shapes.get(node)
        new_value = self.env.get(source)
        if old_in is None or old_out is None or not isinstance(new_value, torch.Tensor):
            return
        new_in = tuple(new_value.shape)
        if len(old_in) == len(new_in) and all(same_size(a, b) for a, b in zip(old_in, new_in)):
            return
        form, sizes = _shape_args(node)
        # Under a dynamic prompt length the sizes are SymInt nodes (the s27 placeholder): compare their values. A
        # size that an earlier rewrite already reads from this input (sym_size) follows it as it is.
        traced = [_input_dim(size, source) or _traced_size(size) for size in sizes]
        patched = _rederive(traced, old_in, new_in, old_out, preserve_numel=_SHAPE_OPS[op_name(node)])
        if patched is None and _SHAPE_OPS[op_name(node)]:
            patched = _unflattened(traced, old_in, new_in, self.tokens)
        if patched is None and _lays_out_a_grid(old_in, new_in, old_out):
            where = module_paths(node)
            raise MatchFailure(f"{where[-1] if where else node.name} lays the tokens out as a grid "
                               f"({node.name}: {list(old_in)} -> {list(old_out)}), as a pooling or pixel-shuffle "
                               f"layer does (a VLM connector such as Gemma3's multi_modal_projector, or a grid token "
                               f"mixer); merged or dropped tokens do not fill the grid, so the tokens cannot be reduced "
                               f"before it (in a VLM, language-model policies, llm=, prune after the connector)")
        if patched is None:
            raise MatchFailure(f"{node.name} ({op_name(node)}{tuple(traced)}): cannot tell which size is the "
                               f"token count after its input changed from {list(old_in)} to {list(new_in)}")
        patched = [size if new is old else new for size, old, new in zip(sizes, traced, patched)]
        if patched != sizes:
            values = []
            for size in patched:
                if isinstance(size, InputDim):
                    with node.graph.inserting_before(node):
                        size_node = node.graph.call_function(torch.ops.aten.sym_size.int, (source, size.dim))
                    # Inserted behind the interpreter's position: give it its value here.
                    self.env[size_node] = size_node.meta["val"] = self.env[source].shape[size.dim]
                    values.append(size_node)
                else:
                    values.append(size)
            node.args = form(values)
            shown = [f"{source.name}.size({s.dim})" if isinstance(s, InputDim) else _traced_size(s) for s in patched]
            self.patched.append(f"{node.name}: {tuple(sizes)} -> ({', '.join(map(str, shown))})")


def _traced_size(size):
    """A size argument's traced value: a literal itself, a SymInt node its symbolic value."""
    if isinstance(size, fx.Node):
        value = size.meta.get("example_value", size.meta.get("val"))
        return value if isinstance(value, (int, torch.SymInt)) else size
    return size


def _input_dim(size, source: fx.Node) -> Optional[InputDim]:
    """InputDim(d) for a size node that reads dim d of the op's own input, else None."""
    if isinstance(size, fx.Node) and size.target is torch.ops.aten.sym_size.int and size.args[0] is source:
        return InputDim(size.args[1])
    return None


def _is_size(size) -> bool:
    return isinstance(size, (int, torch.SymInt)) and not (isinstance(size, int) and size == -1)


def _key(size) -> str:
    return str(size)


def _shape_args(node: fx.Node):
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        container = type(rest[0])
        return (lambda sizes: (node.args[0], container(sizes))), list(rest[0])
    return (lambda sizes: (node.args[0], *sizes)), list(rest)


@dataclasses.dataclass(frozen=True)
class InputDim:
    """A size to read from the op's input at run time (the token count is symbolic after a cut)."""

    dim: int


def _rederive(sizes: list, old_in: tuple, new_in: tuple, old_out: tuple, preserve_numel: bool) -> Optional[list]:
    """New sizes. First candidate: leading dims aligned with the input take its new sizes. If that
    does not keep numel, other literals equal to a changed size (or to a flattened B*N) are mapped
    too, unless the same literal is also an unchanged size (then it is ambiguous: None). A new size
    that is symbolic comes back as InputDim(d): read it from the input's dim d."""
    if len(sizes) != len(old_out):
        return None
    changed: dict = {}
    for dim, (old, new) in enumerate(zip(old_in, new_in)):
        if not same_size(old, new):
            if _key(old) in changed and not same_size(changed[_key(old)][0], new):
                return None
            changed.setdefault(_key(old), (new, dim))
    unchanged_values = {_key(old) for old, new in zip(old_in, new_in) if same_size(old, new)}
    aligned = list(sizes)
    free = []
    for i, size in enumerate(sizes):
        if not _is_size(size):
            continue
        if i < len(old_in) and all(same_size(old_out[j], old_in[j]) for j in range(i + 1)):
            if not same_size(old_in[i], new_in[i]):
                aligned[i] = new_in[i] if isinstance(new_in[i], int) else InputDim(i)
        else:
            free.append(i)
    if preserve_numel and _keeps_numel(aligned, old_in, new_in, preserve_numel):
        return aligned
    mapped = list(aligned)
    for i in free:
        size = sizes[i]
        if _key(size) in changed:
            if _key(size) in unchanged_values:
                return None
            new, dim = changed[_key(size)]
            mapped[i] = new if isinstance(new, int) else InputDim(dim)
            continue
        for k in range(2, len(old_in) + 1):  # a flattened token axis (B*N), static sizes only
            if all(isinstance(d, int) for d in old_in[:k] + new_in[:k]) and old_in[:k] != new_in[:k] \
                    and isinstance(size, int) and size == math.prod(old_in[:k]):
                mapped[i] = math.prod(new_in[:k])
                break
    return mapped if _keeps_numel(mapped, old_in, new_in, preserve_numel) else None


def _lays_out_a_grid(old_in: tuple, new_in: tuple, old_out: tuple) -> bool:
    """A view that splits the token axis (the input axis whose size the cut changed) into two grid axes of the
    output: N -> (h, w) with h * w = N."""
    if len(old_out) != len(old_in) + 1 or not all(isinstance(d, int) for d in old_in + old_out):
        return False
    return any(old_in[:d] == old_out[:d] and old_out[d] * old_out[d + 1] == old_in[d] and old_out[d] > 1
               and old_out[d + 1] > 1 and old_in[d + 1:] == old_out[d + 2:] and not same_size(old_in[d], new_in[d])
               for d in range(len(old_in)))


def _unflattened(sizes: list, old_in: tuple, new_in: tuple, tokens) -> Optional[list]:
    """A view that splits a flattened token axis back out (an MoE layer's [B*N, D] -> view(B, N, D)) after the
    cut made N a symbolic count: the one literal equal to the traced count N, inside the one changed input dim's
    old size, becomes -1 (the view infers it). None when that is not unambiguous."""
    changed = [dim for dim, (old, new) in enumerate(zip(old_in, new_in)) if not same_size(old, new)]
    if tokens is None or -1 in sizes or len(changed) != 1 or not isinstance(old_in[changed[0]], int):
        return None
    matches = [i for i, size in enumerate(sizes) if isinstance(size, int) and size == tokens]
    if len(matches) != 1 or old_in[changed[0]] % tokens != 0:
        return None
    return [-1 if i == matches[0] else size for i, size in enumerate(sizes)]


def same_size(a, b) -> bool:
    """Equal sizes, comparing symbolic sizes by expression (never by bool(), which adds guards)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _keeps_numel(sizes: list, old_in: tuple, new_in: tuple, preserve_numel: bool) -> bool:
    """Static sizes: numel must match. Symbolic token counts: each input dim that changed must be read
    from the input (or absorbed by -1), since FakeTensor would only defer a mismatch to run time."""
    if not preserve_numel:
        return True
    if not all(isinstance(d, int) for d in new_in) or not all(isinstance(s, int) for s in sizes):
        changed = {j for j, (old, new) in enumerate(zip(old_in, new_in)) if not same_size(old, new)}
        read = {s.dim for s in sizes if isinstance(s, InputDim)}
        return -1 in sizes or changed <= read
    target = math.prod(new_in)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        return known != 0 and target % known == 0
    return known == target


def rederive_sizes_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Fix token-count literals downstream of every cut, checking each node with fake tensors."""
    old_shapes = {node: shape_of(node) for node in gm.graph.nodes}
    rederiver = _SizeRederiver(gm, old_shapes, ctx.tokens if ctx.vlm.language is not None or ctx.blocks else None)
    with fake_propagation(ctx.fake_mode):
        rederiver.run(*ctx.fake_inputs)
    ctx.propagated = True
    for change in rederiver.patched:
        ctx.record("rederive_sizes", change)
    return gm
