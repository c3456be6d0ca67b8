"""What the passes share: the policy, the matched blocks, and a log of what each pass changed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tokensparse.fx.patterns.blocks import Block
from tokensparse.policies import Policy

log = logging.getLogger("tokensparse")

STANDS_FOR = "tokensparse_stands_for"


@dataclass
class CallerSide:
    """What the caller does around the graph, as the passes read it (config.CallerFacts): whether the decode masks
    follow each layer's pruned or evicted cache (tokensparse.compile() and the ONNX generation pair cut them), each
    decoder layer's sliding window, and whether a language-model policy pruned the layers a KV policy evicts."""

    masks_follow_cache: bool = False
    sliding_windows: tuple = ()                # each decoder layer's window (0: full)
    pruned_and_evicted: bool = False
    compiled_by_regions: bool = False          # the backend compiles each block as a region (tokensparse.regions)
    image_counts_checked: bool = False         # the forward checked equal image-token counts before the prefill


@dataclass
class LanguageModelState:
    """A vision-language model's graph: its language model, and what the tower and sequence passes found and cut."""

    language: Optional[object] = None          # patterns.language_model.LanguageModelMatch
    acted_layers: list = field(default_factory=list)     # decoder layers that a cut comes before
    feature_rows: Optional[tuple] = None       # VisionZip: (kept encoder rows node, rows cut before the projector,
    #                                            features)
    # A vision-encoder policy (ToMe, TopK) in a VLM's tower: the features it hands the projector
    # (patterns.vision_features.VisionFeatures), and the language-model policy applied after it (or None).
    tower_features: Optional[object] = None
    llm: Optional[Policy] = None


@dataclass
class CacheState:
    """A decoder graph's KV cache, for a KV-cache policy."""

    sites: Optional[list] = None               # patterns.kv_cache.CacheSite per attention


@dataclass
class PassContext:
    """What the passes share, by concern: the policy and the matched blocks, the caller's side, a VLM's language
    model, a decoder's cache, and what the passes changed."""

    policy: Policy
    blocks: list[Block]
    prefix_tokens: int
    fake_inputs: list
    fake_mode: object
    caller: CallerSide = field(default_factory=CallerSide)
    vlm: LanguageModelState = field(default_factory=LanguageModelState)
    kv: CacheState = field(default_factory=CacheState)
    # Filled by the passes:
    tokens_in: dict = field(default_factory=dict)        # block index -> tokens entering it after rewrite
    size_nodes: dict = field(default_factory=dict)       # block index -> ToMe size node its attention sees
    acted_blocks: list = field(default_factory=list)    # block indices (or layer paths) where a step was inserted
    changes: list = field(default_factory=list)
    original_output_shapes: Optional[list] = None
    propagated: bool = False        # every node's meta["val"] is fresh from a FakeTensor run

    def record(self, pass_name: str, message: str) -> None:
        self.changes.append((pass_name, message))
        log.debug("%s: %s", pass_name, message)

    @property
    def depth(self) -> int:
        return len(self.vlm.language.layers) if self.vlm.language is not None else len(self.blocks)

    @property
    def tokens(self):
        """The token count entering the first block (or decoder layer) as traced."""
        return self.vlm.language.sequence if self.vlm.language is not None else self.blocks[0].tokens


def replace_uses_except(node: fx.Node, replacement: fx.Node, keep: Optional[set] = None) -> None:
    """Point every user of `node` at `replacement`, except the nodes in `keep`; the replacement is
    marked as standing for `node` so the sizes pass can compare old and new shapes."""
    keep = keep or set()
    replacement.meta[STANDS_FOR] = node
    node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user not in keep)


def original_node(node: fx.Node) -> fx.Node:
    """The node a chain of replacements stands for (itself if it replaced nothing)."""
    while STANDS_FOR in node.meta:
        node = node.meta[STANDS_FOR]
    return node
