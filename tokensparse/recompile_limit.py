"""Say when dynamo stops compiling a frame that tokensparse rewrote: past its recompile limit it runs the frame
eagerly, so a new input shape would silently run unpruned."""

from __future__ import annotations

import logging
import warnings

_frames: set = set()            # dynamo frame ids that the tokensparse backend compiled
_warned: set = set()
_installed: list = []


def remember_frame() -> None:
    """Record the frame dynamo is compiling now as one the tokensparse backend rewrites."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    if compile_id is not None:
        _frames.add(compile_id.frame_id)
    if not _installed:
        logging.getLogger("torch._dynamo.convert_frame").addFilter(_RecompileLimitFilter())
        _installed.append(True)


class _RecompileLimitFilter(logging.Filter):
    """Turns dynamo's "hit config.recompile_limit" log record about a tokensparse frame into a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        from torch._guards import CompileContext

        if not str(record.msg).startswith("torch._dynamo hit config."):
            return True
        compile_id = CompileContext.current_compile_id()
        if compile_id is None or compile_id.frame_id not in _frames or compile_id.frame_id in _warned:
            return True
        _warned.add(compile_id.frame_id)
        limit_type, limit, function = record.args[:3]
        from tokensparse.warn import TokensparseWarning

        warnings.warn(f"tokensparse: dynamo reached its {limit_type} ({limit}) for {function}; from now on a call "
                      f"that needs a new compile runs eagerly and unpruned. tokensparse.compile() gives each "
                      f"model its own recompile count; or raise torch._dynamo.config.{limit_type}",
                      TokensparseWarning, stacklevel=2)
        return True
