"""Token-reduction policies: one small file per method, each with plain-PyTorch step functions."""

from tokensparse.policies.adaptive_kv import AdaptiveKV
from tokensparse.policies.base import Policy
from tokensparse.policies.divprune import DivPrune
from tokensparse.policies.dtd import DTD
from tokensparse.policies.fastv import FastV
from tokensparse.policies.h2o import H2O
from tokensparse.policies.key_norm import KeyNorm
from tokensparse.policies.kv_policy import KVPolicy
from tokensparse.policies.language import LanguagePolicy
from tokensparse.policies.pyramiddrop import PyramidDrop
from tokensparse.policies.snapkv import SnapKV
from tokensparse.policies.streamingllm import StreamingLLM
from tokensparse.policies.tome import ToMe
from tokensparse.policies.topk import TopK
from tokensparse.policies.vision_budget import VisionBudget
from tokensparse.policies.visionzip import VisionZip
from tokensparse.policies.visual_exit import VisualExit

POLICIES = {cls.name: cls for cls in (ToMe, TopK, FastV, PyramidDrop, DivPrune, VisualExit, SnapKV, StreamingLLM,
                                      H2O, AdaptiveKV, VisionBudget, KeyNorm, VisionZip, DTD)}

__all__ = ["POLICIES", "AdaptiveKV", "DTD", "DivPrune", "FastV", "H2O", "KVPolicy", "KeyNorm", "LanguagePolicy", "Policy",
           "PyramidDrop", "SnapKV", "StreamingLLM", "ToMe", "TopK", "VisionBudget", "VisionZip", "VisualExit"]
