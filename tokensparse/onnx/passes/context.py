"""State shared by the ONNX passes of one rewrite."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import onnx_ir as ir

from tokensparse.onnx.patterns.blocks import OnnxBlock


@dataclass
class OnnxPassContext:
    model: ir.Model
    policy: object
    blocks: list[OnnxBlock]
    prefix_tokens: int
    tokens_in: list[int] = field(default_factory=list)      # tokens entering each block after the rewrite
    sizes_after: dict = field(default_factory=dict)          # ToMe: block index -> size value after its merge
    first_cut: Optional[ir.Node] = None                      # the first node the policy inserted
    inserted: set = field(default_factory=set)               # every node the passes inserted
    notes: list[str] = field(default_factory=list)           # what was done or skipped, for --explain

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def tokens(self) -> int:
        return self.blocks[0].tokens

    def positions(self) -> dict:
        return {node: position for position, node in enumerate(self.graph)}

    def redirect_uses(self, old: ir.Value, new: ir.Value, keep: set) -> None:
        """Point every use of `old` outside the nodes in `keep` at `new`."""
        for use in list(old.uses()):
            if use.node not in keep:
                use.node.replace_input_with(use.idx, new)
        for index, output in enumerate(self.graph.outputs):
            if output is old:
                self.graph.outputs[index] = new
