"""Read-only matchers over FX graphs. Each returns a match or raises MatchFailure with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tokensparse.fx.patterns.attention import AttentionSite, find_attention_sites
from tokensparse.fx.patterns.blocks import Block, find_blocks
from tokensparse.pipeline import check_prefix_override
from tokensparse.fx.patterns.tokens import find_prefix_tokens, patch_grid


@dataclass
class ModelMatch:
    """What the patterns found in one graph."""

    sites: list[AttentionSite]
    blocks: list[Block]
    list_path: str
    prefix_tokens: int
    grid: Optional[tuple]                            # patch rows and columns, when known
    notes: list[str] = field(default_factory=list)   # patterns that did not match, and why

    @property
    def depth(self) -> int:
        return len(self.blocks)


def match_vision_encoder(gm: fx.GraphModule, prefix_tokens=None) -> ModelMatch:
    """Attention sites, the block list, and the prefix tokens of a vision transformer graph."""
    sites, notes = find_attention_sites(gm)
    found = find_blocks(gm, sites)
    first = found.blocks[0]
    if prefix_tokens is None:
        prefix_tokens = find_prefix_tokens(first.input, first.tokens)
    elif prefix_tokens >= first.tokens:
        raise ValueError(f"prefix_tokens={prefix_tokens} is out of range: the model has {first.tokens} tokens "
                         f"entering its first block")
    grid = patch_grid(first.input)
    if grid is not None and isinstance(first.tokens, int):
        check_prefix_override(prefix_tokens, first.tokens - grid[0] * grid[1], first.tokens)
    return ModelMatch(sites, found.blocks, found.list_path, prefix_tokens, grid, notes + found.skipped)


__all__ = ["AttentionSite", "Block", "ModelMatch", "match_vision_encoder"]
