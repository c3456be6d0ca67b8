"""What the language-model policies share: a stage is one cut before a decoder layer that keeps a
fraction of the surviving vision tokens (and every text token), chosen by one scoring rule."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

from tokensparse.policies.base import Policy

# How a stage scores the vision tokens it chooses among.
SCORES = (
    "previous_attention",   # FastV: attention received in the layer before the cut, from q and k rows
    "next_projection",      # PyramidDrop: the last token through the next layer's norm, q/k projections, RoPE
    "diversity",            # DivPrune: greedy max-min cosine distance of the tokens' features
    "none",                 # visual-token exit: every vision token goes
    "encoder_attention",    # VisionZip: the rows kept at the vision encoder's feature layer
    "temporal",             # DTD: similarity to the same patch in the previous video frame (keep holds tau)
)

# Which RoPE positions the kept tokens take from a cut on.
POSITIONS = (
    "original",             # their own (FastV, DivPrune): the dropped tokens leave gaps
    "compact",              # renumbered consecutively (PyramidDrop): as if the dropped tokens were never there
)


@dataclass(frozen=True)
class Stage:
    """Before decoder layer `layer`, keep `keep` of the vision tokens still there (0 drops them all)."""

    layer: int
    keep: float
    score: str
    query: str = "last"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"Stage score={self.score!r} is unknown: choose one of {list(SCORES)}")


class LanguagePolicy(Policy):
    """A policy that prunes vision tokens of a vision-language model's sequence (stage "llm")."""

    stage = "llm"
    vision_span: Optional[tuple] = None
    positions: str = "original"
    stage_in_tower = False      # chooses the tokens at the vision tower's feature layer (VisionZip)
    equal_image_counts = True   # keeps a dense batch by keeping as many image tokens in every sample

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def first_layer(self) -> int:
        """The smallest decoder layer a stage may sit before."""
        return 0

    def check_depth(self, depth: int) -> None:
        for stage in self.stages():
            if not self.first_layer() <= stage.layer < depth:
                raise ValueError(f"layer {stage.layer} is out of range: {self.name} needs {self.first_layer()} <= "
                                 f"layer < {depth} (the language model has {depth} layers)")

    def is_identity(self, depth: int) -> bool:
        return all(stage.keep == 1.0 for stage in self.stages())


def check_vision_span(span) -> Optional[tuple]:
    """None, or (start, end) with 0 <= start < end: the positions that hold vision tokens."""
    if span is None:
        return None
    if (not isinstance(span, (tuple, list)) or len(span) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in span)
            or not 0 <= span[0] < span[1]):
        raise ValueError(f"vision_span={span!r} must be (start, end) positions with 0 <= start < end")
    return tuple(int(v) for v in span)



def check_positions(positions) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is unknown: choose one of {list(POSITIONS)}")
