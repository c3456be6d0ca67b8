"""What the two front ends share: the pass protocol, its driver and its failure. A pass is
`(target, ctx) -> target` (an FX GraphModule for tokensparse.fx, an onnx-ir Model for tokensparse.onnx);
run_passes applies an ordered pass list; a pass that does not match or cannot verify its result raises
MatchFailure with the reason. passes() lists both front ends' pass lists in the order they run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

logger = logging.getLogger("tokensparse.pipeline")

Target = TypeVar("Target")
Pass = Callable[[Target, object], Target]


class MatchFailure(Exception):
    """A pattern did not match, or a rewrite could not be verified; carries the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def run_passes(passes, target: Target, ctx) -> Target:
    """Apply each pass in order, `target = rewrite_pass(target, ctx)`. MatchFailure and any other exception
    raise through: each entry point decides its fallback."""
    for rewrite_pass in passes:
        logger.debug("running %s", rewrite_pass.__name__)
        target = rewrite_pass(target, ctx)
    return target


def check_prefix_override(prefix_tokens: int, model_prefix: int, tokens: int) -> None:
    """prefix_tokens= may protect fewer tokens than the model's prefix (0 lets CLS merge), never more: the extra
    ones would be patch tokens kept out of the policy."""
    if prefix_tokens > model_prefix:
        raise ValueError(f"prefix_tokens={prefix_tokens} is more than the model's {model_prefix} prefix token(s) "
                         f"({tokens} tokens enter its first block, {tokens - model_prefix} of them patches): it would "
                         f"keep {prefix_tokens - model_prefix} patch token(s) out of the policy; give at most "
                         f"{model_prefix} (0 lets the prefix tokens merge too) or leave it out")


def summary(rewrite_pass) -> str:
    """The first line of a pass's docstring."""
    doc = (rewrite_pass.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


@dataclass(frozen=True)
class PassLists:
    """Every pass list of both front ends, in the order each runs; str() prints them with each pass's summary."""

    lists: tuple            # ((front end module, list name, (pass, ...)), ...)

    def names(self, list_name: str) -> list[str]:
        return [rewrite_pass.__name__ for _, name, passes in self.lists if name == list_name for rewrite_pass in passes]

    def __str__(self) -> str:
        lines = []
        for module, name, passes in self.lists:
            lines.append(f"{module}.{name}:")
            if not passes:
                lines.append("  (not importable: the onnx extra is not installed, pip install 'tokensparse[onnx]')")
                continue
            width = max(len(rewrite_pass.__name__) for rewrite_pass in passes)
            lines += [f"  {index}. {rewrite_pass.__name__:<{width}}  {summary(rewrite_pass)}"
                      for index, rewrite_pass in enumerate(passes, 1)]
        return "\n".join(lines)

    __repr__ = __str__


def passes() -> PassLists:
    """The FX passes (tokensparse.fx.passes: PASSES, KV_PASSES, KV_CHECKS, PRUNED_STATIC_DECODE_PASSES) and the ONNX
    passes (tokensparse.onnx.passes: ONNX_PASSES), each list in the order it runs."""
    from tokensparse.fx import passes as fx_passes

    try:
        from tokensparse.onnx.passes import ONNX_PASSES
    except ModuleNotFoundError:         # onnx-ir and onnxscript are the onnx extra's
        ONNX_PASSES = ()
    fx_lists = ("PASSES", "KV_PASSES", "KV_CHECKS", "PRUNED_STATIC_DECODE_PASSES")
    return PassLists(tuple([("tokensparse.fx.passes", name, tuple(getattr(fx_passes, name))) for name in fx_lists]
                           + [("tokensparse.onnx.passes", "ONNX_PASSES", tuple(ONNX_PASSES))]))
