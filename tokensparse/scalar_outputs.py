"""dynamo's capture_scalar_outputs, scoped to one compiled model's calls. A VLM's image merge reads the image-token
count with .item() (Idefics3, SmolVLM): without the flag dynamo splits the graph there and the language model is
found without its vision span. Some models' code fails to trace with it (Mistral3's patch merger splits its
features by sizes read with .item()): such a model runs without the flag from its first failure on."""

from __future__ import annotations

import torch


class ScalarOutputs:
    """Calls a compiled function with capture_scalar_outputs on, until dynamo fails to trace it so; that call is
    then made again without the flag, and so are all later ones."""

    def __init__(self):
        self.enabled = True

    def __call__(self, compiled, *args, **kwargs):
        if not self.enabled:
            return compiled(*args, **kwargs)
        before = _cache_length(kwargs)
        try:
            with torch._dynamo.config.patch(capture_scalar_outputs=True):
                return compiled(*args, **kwargs)
        except torch._dynamo.exc.InternalTorchDynamoError:
            if _cache_length(kwargs) != before:
                raise       # the failed call already wrote into the KV cache: running it again would repeat that
            self.enabled = False
        return compiled(*args, **kwargs)


def _cache_length(kwargs: dict):
    cache = kwargs.get("past_key_values")
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
