"""What the KV-cache policies share: they choose, per decoder layer and KV head, which cached positions
stay for the next decode steps (stage "kv"). Positions keep their original RoPE rotation."""

from __future__ import annotations

from tokensparse.policies.base import Policy


class KVPolicy(Policy):
    """A policy that shrinks a decoder's KV cache (Config(kv=...))."""

    stage = "kv"

    def evicts(self, query_length: int, cache_length: int) -> bool:
        """Whether a forward with this many new queries, whose cache then holds `cache_length` positions,
        evicts (static sizes; a symbolic size is compared once and guarded)."""
        raise NotImplementedError

    def kept_count(self, cache_length: int) -> int:
        """Positions kept per layer and KV head out of `cache_length`."""
        raise NotImplementedError

    def is_identity(self, depth: int) -> bool:
        return False
