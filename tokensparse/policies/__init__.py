"""Token-reduction policies: one small file per method, each with plain-PyTorch step functions."""

from tokensparse.policies.base import Policy
from tokensparse.policies.divprune import DivPrune
from tokensparse.policies.fastv import FastV
from tokensparse.policies.language import LanguagePolicy
from tokensparse.policies.pyramiddrop import PyramidDrop
from tokensparse.policies.tome import ToMe
from tokensparse.policies.topk import TopK
from tokensparse.policies.visual_exit import VisualExit

POLICIES = {cls.name: cls for cls in (ToMe, TopK, FastV, PyramidDrop, DivPrune, VisualExit)}

__all__ = ["POLICIES", "DivPrune", "FastV", "LanguagePolicy", "Policy", "PyramidDrop", "ToMe", "TopK",
           "VisualExit"]
