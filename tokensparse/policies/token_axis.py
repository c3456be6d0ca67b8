"""tokensparse::tokens_as_symbol: the tokens unchanged, their count a fresh symbol to the passes (as after a cut),
which lets the first block of a vision encoder share the compile of the blocks after a cut
(fx/passes/symbolic_first_block.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensparse.policies.op_shapes import token_count


@torch.library.custom_op("tokensparse::tokens_as_symbol", mutates_args=())
def tokens_as_symbol_op(x: Tensor) -> Tensor:
    """x [B, N, C] unchanged; to the passes its token count N is a fresh symbol, as after a cut."""
    return x.clone()


@tokens_as_symbol_op.register_fake
def _tokens_as_symbol_fake(x):
    batch, tokens, channels = x.shape
    return x.new_empty(batch, token_count(tokens), channels)


def same_tokens(x: Tensor) -> Tensor:
    """tokensparse::tokens_as_symbol as the function Inductor compiles: the tokens themselves."""
    return x


TOKENS_AS_SYMBOL = torch.ops.tokensparse.tokens_as_symbol.default
