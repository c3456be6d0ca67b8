"""Transformer blocks: the repeated modules holding one attention each, their input stream and the
residual add after attention (the stream point where ToMe merges and EViT prunes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tokensparse.fx.patterns.attention import AttentionSite
from tokensparse.fx.patterns.graph import downstream, is_op, module_paths, shape_of
from tokensparse.pipeline import MatchFailure

_INDEXED = re.compile(r"^(?P<list>.+)\.(?P<index>\d+)$")


@dataclass
class Block:
    """One transformer block of the graph (index is its position among the matched blocks)."""

    index: int
    path: str
    site: AttentionSite
    input: fx.Node
    attn_residual: fx.Node
    tokens: int
    nodes: set = field(default_factory=set, repr=False)


@dataclass
class BlockMatch:
    blocks: list[Block]
    list_path: str
    skipped: list[str]


def block_path(site: AttentionSite) -> Optional[str]:
    """The deepest module on the attention's stack that is an element of a ModuleList/Sequential."""
    for path in reversed(module_paths(site.node)):
        if _INDEXED.match(path):
            return path
    return None


def find_blocks(gm: fx.GraphModule, sites: list[AttentionSite]) -> BlockMatch:
    """Group attention sites into blocks of one repeated list; raise MatchFailure with the reason."""
    if not sites:
        raise MatchFailure(_no_attention_reason(gm))
    by_path: dict[str, list[AttentionSite]] = {}
    skipped = []
    for site in sites:
        path = block_path(site)
        if path is None:
            skipped.append(f"attention at {site.module_path}: not inside a repeated block, left unchanged")
            continue
        by_path.setdefault(path, []).append(site)
    if not by_path:
        raise MatchFailure("attention found, but none inside a repeated block list (" + "; ".join(skipped) + "): "
                           "this graph holds single blocks or attention modules, as when a graph break makes dynamo "
                           "compile the blocks one at a time (torch._dynamo.explain(model)(inputs) lists the breaks); "
                           "the rewrite needs the block list in one graph")
    lists: dict[str, list[str]] = {}
    for path in by_path:
        lists.setdefault(_INDEXED.match(path).group("list"), []).append(path)
    list_path = next(iter(lists))
    for other in list(lists)[1:]:
        skipped.append(f"block list {other} ({len(lists[other])} blocks): only the first list, "
                       f"{list_path}, is rewritten")
    nodes_by_path = _nodes_by_block(gm, set(lists[list_path]))
    order = {node: position for position, node in enumerate(gm.graph.nodes)}
    blocks = []
    for index, path in enumerate(lists[list_path]):
        if len(by_path[path]) != 1:
            raise MatchFailure(f"block {path} holds {len(by_path[path])} attentions; one was expected")
        blocks.append(_match_block(index, path, by_path[path][0], nodes_by_path[path], order))
    return BlockMatch(blocks, list_path, skipped)


_ATTENTION_MODULE = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*$", re.IGNORECASE)


def _no_attention_reason(gm: fx.GraphModule) -> str:
    """Why a graph holds no attention: none in the model, or a graph break that left an attention module's
    code partly in this graph and partly in another."""
    inside = sorted({path for node in gm.graph.nodes for path in module_paths(node) if _ATTENTION_MODULE.search(path)})
    if inside:
        return (f"no attention found in this graph although it holds code of {inside[0]}: a graph break inside a "
                f"block splits it across graphs, and the rewrite needs each block whole in one graph "
                f"(torch._dynamo.explain(model)(inputs) lists the graph breaks)")
    return "no attention found (neither scaled_dot_product_attention nor matmul-softmax-matmul)"


def _nodes_by_block(gm: fx.GraphModule, paths: set) -> dict[str, set]:
    result = {path: set() for path in paths}
    for node in gm.graph.nodes:
        for path in module_paths(node):
            if path in result:
                result[path].add(node)
                break
    return result


def _match_block(index: int, path: str, site: AttentionSite, nodes: set, order: dict) -> Block:
    tokens = site.tokens
    outside = []
    for node in sorted(nodes, key=order.__getitem__):
        for inp in node.all_input_nodes:
            shape = shape_of(inp)
            if (inp not in nodes and inp not in outside and inp.op not in ("get_attr",)
                    and shape is not None and len(shape) == 3 and shape[1] == tokens):
                outside.append(inp)
    grids = [inp for node in nodes for inp in node.all_input_nodes
             if inp not in nodes and shape_of(inp) is not None and len(shape_of(inp)) == 4 and inp.op != "get_attr"]
    if not outside and grids:
        grid = list(shape_of(grids[0]))
        raise MatchFailure(f"block {path}: its tokens enter as a {grid} grid and attention runs over windows of "
                           f"{tokens} tokens inside the block (windowed attention, as in Swin); merging and "
                           f"pruning need the tokens as one [B, N, D] sequence between blocks")
    if len(outside) != 1:
        names = [n.name for n in outside]
        raise MatchFailure(f"block {path}: expected one [B, {tokens}, D] stream entering the block, "
                           f"found {len(outside)} {names}")
    stream = outside[0]
    after_attention = downstream([site.node], within=nodes)
    for node in sorted(after_attention, key=order.__getitem__):
        if is_op(node, "add", "iadd", "add_") and stream in node.args[:2]:
            other = node.args[1] if node.args[0] is stream else node.args[0]
            if other in after_attention and shape_of(node) == shape_of(stream):
                return Block(index, path, site, stream, node, tokens, nodes)
    raise MatchFailure(f"block {path}: no residual add of the block input and the attention output")

