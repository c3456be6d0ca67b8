"""VisionZip (Yang et al., 2024): at the vision encoder's output keep the dominant tokens (most attended
by CLS, or most attended overall without CLS) and merge the rest into a few contextual tokens. Plain
PyTorch step functions; the VLM pass that splices them in comes with the VLM issue."""

from __future__ import annotations

import torch


def visionzip_step(hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int,
                   contextual: int, protected: int) -> torch.Tensor:
    """hidden [B, N, C]; scores [B, N - p] (attention received, CLS row summed over heads when there is a
    CLS); keys [B, N, c] (the layer's keys averaged over heads). Returns [B, p + dominant' + contextual]:
    the prefix, the top (dominant - p) patch tokens in original order, then the contextual tokens."""
    batch, tokens, channels = hidden.shape
    patches = tokens - protected
    top = dominant - protected
    if not 0 <= top <= patches or not 0 <= contextual <= patches - top:
        raise ValueError(f"dominant={dominant}, contextual={contextual} do not fit {patches} patch tokens after "
                         f"{protected} prefix tokens")
    rest_hidden, rest_keys = hidden[:, protected:], keys[:, protected:]
    kept = scores.topk(top, dim=-1).indices.sort(dim=-1).values                                  # [B, top]
    parts = [hidden[:, :protected], rest_hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, channels))]
    if contextual:
        parts.append(_contextual_tokens(rest_hidden, rest_keys, kept, contextual))
    return torch.cat(parts, dim=1)


def _contextual_tokens(hidden, keys, kept, count: int) -> torch.Tensor:
    """Among the tokens not kept, `count` targets at a uniform stride; every other remaining token joins
    its most cosine-similar target; each contextual token = target + mean of the tokens that joined it."""
    batch, patches, channels = hidden.shape
    remaining_mask = torch.ones(batch, patches, dtype=torch.bool, device=hidden.device)
    remaining_mask.scatter_(1, kept, False)
    remaining = remaining_mask.nonzero()[:, 1].view(batch, -1)                                   # [B, R]
    stride = remaining.shape[1] // count
    target_slots = torch.arange(count, device=hidden.device) * stride
    is_target = torch.zeros(remaining.shape[1], dtype=torch.bool, device=hidden.device)
    is_target[target_slots] = True
    targets, others = remaining[:, is_target], remaining[:, ~is_target]
    metric = torch.nn.functional.normalize(keys, dim=-1)
    gather = lambda source, index: source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))  # noqa: E731
    similarity = gather(metric, others) @ gather(metric, targets).transpose(1, 2)              # [B, O, T]
    assignment = similarity.argmax(dim=-1)                                                       # [B, O]
    sums = torch.zeros(batch, count, channels, dtype=hidden.dtype, device=hidden.device)
    sums.scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, channels), gather(hidden, others))
    counts = torch.zeros(batch, count, 1, dtype=hidden.dtype, device=hidden.device)
    counts.scatter_add_(1, assignment.unsqueeze(-1), torch.ones_like(assignment, dtype=hidden.dtype).unsqueeze(-1))
    return gather(hidden, targets) + sums / counts.clamp_min(1)
