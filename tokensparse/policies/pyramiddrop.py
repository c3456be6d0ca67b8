"""PyramidDrop (Xing et al., CVPR 2025): the language model runs in stages; before each stage's first
layer keep a fraction `ratio` of the surviving vision tokens, ranked by the attention they receive from
the last token, computed with that layer's own input norm, q/k projections and RoPE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tokensparse.policies.base import check_fraction, check_int_at_least
from tokensparse.policies.language import LanguagePolicy, Stage, check_vision_span


@dataclass(frozen=True)
class PyramidDrop(LanguagePolicy):
    """PyramidDrop (Xing et al., CVPR 2025): keep `ratio` of the vision tokens before each of `layers`."""

    layers: Sequence[int] = (8, 16, 24)
    ratio: float = 0.5
    vision_span: Optional[tuple] = None

    name = "pyramiddrop"

    def __post_init__(self):
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        if not layers:
            raise ValueError("layers=() is empty: name at least one decoder layer to prune before")
        for layer in layers:
            check_int_at_least("layers", layer, 1)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers={list(layers)} repeats a layer")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        check_fraction("ratio", self.ratio)
        object.__setattr__(self, "vision_span", check_vision_span(self.vision_span))

    def first_layer(self) -> int:
        return 1

    def stages(self) -> list[Stage]:
        return [Stage(layer, self.ratio, "next_projection") for layer in self.layers]
