"""PyramidDrop (Xing et al., CVPR 2025): the language model runs in stages; before each stage's first
layer keep a fraction `ratio` of the surviving vision tokens, ranked by the attention they receive from
the last token, computed with that layer's own input norm, q/k projections and RoPE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tokensparse.policies.base import check_fraction, checked_layers
from tokensparse.policies.language import LanguagePolicy, Stage, check_positions, check_vision_span


@dataclass(frozen=True)
class PyramidDrop(LanguagePolicy):
    """PyramidDrop (Xing et al., CVPR 2025): keep `ratio` of the vision tokens before each of `layers`."""

    layers: Sequence[int] = (8, 16, 24)
    ratio: float = 0.5
    vision_span: Optional[tuple] = None
    positions: str = "original"

    name = "pyramiddrop"

    def __post_init__(self):
        check_positions(self.positions)
        object.__setattr__(self, "layers", checked_layers("layers", self.layers, 1))
        check_fraction("ratio", self.ratio)
        object.__setattr__(self, "vision_span", check_vision_span(self.vision_span))

    def first_layer(self) -> int:
        return 1

    def stages(self) -> list[Stage]:
        return [Stage(layer, self.ratio, "next_projection") for layer in self.layers]
