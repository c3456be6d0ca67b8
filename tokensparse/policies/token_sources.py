"""Where each token a vision-encoder policy (ToMe, Bolya et al., ICLR 2023; TopK/EViT, Liang et al., ICLR 2022)
leaves in a VLM's vision tower came from: the same policy steps applied to an identity matrix give each token's
source patches, and the token then fills the image position of its first source patch."""

from __future__ import annotations

import torch
from torch import Tensor


def token_sources(x: torch.Tensor) -> torch.Tensor:
    """[B, N, N] identity in x's dtype, for the encoder stream x [B, N, C]: token i comes from row i alone."""
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return eye.expand(x.shape[0], -1, -1).contiguous()


def first_source_rows(sources: torch.Tensor) -> torch.Tensor:
    """[B, N'] the first row each token of sources [B, N', N] holds a share of. The policies' steps partition
    the rows among the tokens they leave (a merge sums its tokens' rows, a prune drops or fuses them), so the
    first rows of distinct tokens differ."""
    return (sources > 0).to(torch.int8).argmax(dim=-1)


def features_at_source_rows(hidden: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden's tokens written at their first source rows of a [B, N, C] zero tensor, N = sources.shape[2];
    those rows ascending [B, N']): the feature rows the projector reads, and which of them hold a token."""
    batch, _, channels = hidden.shape
    rows, order = first_source_rows(sources).sort(dim=1)
    ordered = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, channels))
    full = hidden.new_zeros(batch, sources.shape[2], channels)
    return full.scatter(1, rows.unsqueeze(-1).expand(-1, -1, channels), ordered), rows


@torch.library.custom_op("tokensparse::features_at_source_rows", mutates_args=())
def features_at_source_rows_op(hidden: Tensor, sources: Tensor) -> tuple[Tensor, Tensor]:
    """A vision-encoder policy's output tokens hidden [B, N', C] written at their first source rows (sources
    [B, N', N]) of a [B, N, C] zero tensor, and those rows ascending [B, N']."""
    return features_at_source_rows(hidden, sources)


@features_at_source_rows_op.register_fake
def _features_at_source_rows_fake(hidden, sources):
    batch, tokens, channels = hidden.shape
    return hidden.new_empty(batch, sources.shape[2], channels), hidden.new_empty(batch, tokens, dtype=torch.int64)


FEATURES_AT_SOURCE_ROWS = torch.ops.tokensparse.features_at_source_rows.default
