"""Token-reduction policies: one small file per method, each with plain-PyTorch step functions."""

from tokensparse.policies.base import Policy
from tokensparse.policies.tome import ToMe
from tokensparse.policies.topk import TopK

POLICIES = {cls.name: cls for cls in (ToMe, TopK)}

__all__ = ["POLICIES", "Policy", "ToMe", "TopK"]
