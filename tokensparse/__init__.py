"""tokensparse: token pruning and merging for vision transformers and VLMs, as a compiler."""

from tokensparse.config import Config
from tokensparse.policies import ToMe, TopK
from tokensparse.rewrite import TokensparseWarning

__all__ = ["Config", "ToMe", "TopK", "TokensparseWarning"]
