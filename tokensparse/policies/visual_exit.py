"""Visual-token exit (DyVTE, Sun et al., 2025, in its training-free form; ToDRE's second stage): from
decoder layer `layer` on, every vision token is removed; the text tokens have absorbed the image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokensparse.policies.base import check_int_at_least
from tokensparse.policies.language import LanguagePolicy, Stage, check_positions, check_vision_span


@dataclass(frozen=True)
class VisualExit(LanguagePolicy):
    """Visual-token exit (DyVTE, training-free form): drop every vision token before decoder layer `layer`."""

    layer: int = 16
    vision_span: Optional[tuple] = None
    positions: str = "original"

    name = "exit"

    def __post_init__(self):
        check_positions(self.positions)
        check_int_at_least("layer", self.layer, 1)
        object.__setattr__(self, "vision_span", check_vision_span(self.vision_span))

    def first_layer(self) -> int:
        return 1

    def stages(self) -> list[Stage]:
        return [Stage(self.layer, 0.0, "none")]

    def is_identity(self, depth: int) -> bool:
        return False
