"""What a vision-encoder policy declares for the compilers: the token step it takes after a block's attention
residual, which the FX pass, the ONNX pass and the eager reference all read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# The block values a step may read, by name: the residual stream x [B, N, C], the token sizes [B, N, 1] (None
# before the first merge), the attention's queries and keys [B, H, N, d], its scale and its mask.
BLOCK_INPUTS = ("x", "size", "query", "keys", "scale", "mask")


@dataclass(frozen=True)
class BlockValue:
    """A step argument that is one of the block's values, by name (BLOCK_INPUTS)."""

    name: str

    def __post_init__(self):
        if self.name not in BLOCK_INPUTS:
            raise ValueError(f"a tower step reads {self.name!r}, not a block value ({list(BLOCK_INPUTS)})")


X, SIZE, QUERY, KEYS, SCALE, MASK = (BlockValue(name) for name in BLOCK_INPUTS)


@dataclass(frozen=True)
class CountOfTokens:
    """A step argument computed from the count of tokens entering the step, `rule(tokens, *args)` (integer
    arithmetic, so that it also holds for a symbolic count); `value` is the rule at the traced count, `tokens`. A
    compile that shares one block's code between token counts computes it from the block's input size instead."""

    rule: Callable
    args: tuple
    tokens: int

    @property
    def value(self) -> int:
        return self.rule(self.tokens, *self.args)


@dataclass(frozen=True)
class TowerStep:
    """One token step after a block's attention residual: `op` (a tokensparse:: op) called with `inputs`, the
    block's values (BlockValue) and constants; `function` is the same step in plain PyTorch (the eager reference).
    A `sized` step reads the token sizes and returns (x, sizes); otherwise it returns x."""

    kind: str                   # what it does, as the compiler's record names it ("merge_tokens", "prune_tokens")
    op: Any
    function: Callable
    inputs: tuple
    tokens_after: int
    sized: bool
    note: str                   # what it does in words, for explain()

    def arguments(self, values: dict, count_of_tokens: Callable | None = None) -> tuple:
        """The op's (or function's) arguments, the block's values taken from `values` by name; a CountOfTokens
        argument is its traced value, or count_of_tokens(argument) where given."""
        def argument(item):
            if isinstance(item, BlockValue):
                return values[item.name]
            if isinstance(item, CountOfTokens):
                return item.value if count_of_tokens is None else count_of_tokens(item)
            return item
        return tuple(argument(item) for item in self.inputs)

    def constants(self) -> tuple:
        """The step's inputs with the block's values as None and counts at their traced values."""
        return self.arguments(dict.fromkeys(BLOCK_INPUTS))
