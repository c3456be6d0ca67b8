"""Attention sites: fused scaled_dot_product_attention nodes and unfused matmul-softmax-matmul."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch.fx as fx

from tokensparse.fx.patterns.graph import arg, is_op, module_paths, shape_of

_TRANSPARENT = ("to", "type_as", "dropout", "contiguous", "float", "clone", "_to_copy")


@dataclass
class AttentionSite:
    """One attention computation: its q, k, v ([B, H, N, d]), scale, mask, and where logits go."""

    node: fx.Node            # the SDPA node, or the softmax node of an unfused attention
    kind: str                # "sdpa" or "unfused"
    q: fx.Node
    k: fx.Node
    v: Optional[fx.Node]
    scale: Union[float, fx.Node]   # a Node when dynamo lifted a float attribute into a graph input
    mask: Optional[fx.Node]
    module_path: str

    @property
    def tokens(self) -> int:
        return shape_of(self.k)[2]


def find_attention_sites(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[str]]:
    """All attention sites in graph order, and a reason for each softmax that looked like attention
    but did not match."""
    sites, failures = [], []
    for node in gm.graph.nodes:
        if is_op(node, "scaled_dot_product_attention"):
            sites.append(_sdpa_site(node))
        elif is_op(node, "softmax", "_softmax", "_safe_softmax"):
            site = _unfused_site(node, failures)
            if site is not None:
                sites.append(site)
    return sites, failures


def _path(node: fx.Node) -> str:
    paths = module_paths(node)
    return paths[-1] if paths else "<top level>"


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = node.args[:3]
    scale = arg(node, 6, "scale")
    if scale is None:
        scale = 1.0 / math.sqrt(shape_of(q)[-1])
    elif not isinstance(scale, fx.Node):
        scale = float(scale)
    return AttentionSite(node, "sdpa", q, k, v, scale, arg(node, 3, "attn_mask"), _path(node))


def _strip(node, names=_TRANSPARENT):
    while is_op(node, *names):
        node = node.args[0]
    return node


def _scalar(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _unfused_site(softmax: fx.Node, failures: list) -> Optional[AttentionSite]:
    dim = arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        return None
    scale, mask = 1.0, None
    node = _strip(softmax.args[0])
    # Walk back from the logits: optional mask add, scalar scaling, then q @ k^T.
    for _ in range(4):
        if is_op(node, "add", "add_") and _scalar(node.args[1]) is None:
            node, mask = node.args[0], node.args[1]
        elif is_op(node, "mul", "mul_") and _scalar(node.args[1]) is not None:
            scale, node = scale * _scalar(node.args[1]), node.args[0]
        elif is_op(node, "truediv", "div") and _scalar(node.args[1]) is not None:
            scale, node = scale / _scalar(node.args[1]), node.args[0]
        else:
            break
        node = _strip(node)
    if not is_op(node, "matmul", "bmm"):
        return None
    q, kt = node.args[0], node.args[1]
    if is_op(q, "mul") and _scalar(q.args[1]) is not None:
        scale, q = scale * _scalar(q.args[1]), q.args[0]
    if not is_op(kt, "transpose", "mT") or (is_op(kt, "transpose") and sorted(kt.args[1:3]) not in ([-2, -1], [2, 3])):
        failures.append(f"{_path(softmax)}: softmax over q @ x where x is not a transposed key")
        return None
    k = kt.args[0]
    if shape_of(q) is None or len(shape_of(q)) != 4 or shape_of(k) is None or len(shape_of(k)) != 4:
        failures.append(f"{_path(softmax)}: attention operands are not [B, H, N, d]")
        return None
    v = None
    for user in _users_through(softmax):
        if is_op(user, "matmul", "bmm"):
            v = user.args[1]
    if v is None:
        failures.append(f"{_path(softmax)}: attention probabilities are not multiplied with values")
        return None
    return AttentionSite(softmax, "unfused", q, k, v, scale, mask, _path(softmax))


def _users_through(node: fx.Node):
    for user in node.users:
        if is_op(user, *_TRANSPARENT):
            yield from _users_through(user)
        else:
            yield user

