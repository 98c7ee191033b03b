"""A replay's op capture of one step, in the process that diverged: the window is step k,
from step k−1's commit to its own.

The capture (:class:`reprocheck.localize.OpCapture`) is paused while reprocheck records
(its own work is no part of the step) and resumed, with the stage it is in, by the next
hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .naming import _unwrapped

if TYPE_CHECKING:
    from .recorder import ProcessRecorder


def window_after(rec: ProcessRecorder, committed: int) -> None:
    """Open the op capture once step ``zoom_step − 1`` is committed (steps 0 and 1: from
    the start); close it for good once ``zoom_step`` is (a paused capture is resumed by
    the next hook)."""
    if rec.zoom_step is None:
        return
    if rec.ops is not None and rec.models and committed == 0:
        rec.ops.context.names.update(  # the model is known now: its modules' names
            (id(m), n or type(m).__name__) for n, m in _unwrapped(rec.models[0]).named_modules()
        )
    if committed + 1 == rec.zoom_step and rec.ops is None:
        from ...localize import OpCapture

        model = _unwrapped(rec.models[0]) if rec.models else None
        rec.ops = OpCapture(model)
        resume(rec, "forward")
    elif committed >= rec.zoom_step and rec.ops is not None:
        pause(rec)
        rec.zoom_ops, rec.ops = rec.ops.ops, None


def pause(rec: ProcessRecorder) -> None:
    """reprocheck's own recording is no part of the step: out of the capture."""
    if rec.ops is not None and rec.stage is not None:
        rec.ops.__exit__(None, None, None)
        rec.stage = None


def resume(rec: ProcessRecorder, stage: str) -> None:
    if rec.ops is not None and rec.stage is None and not rec.finished:
        rec.ops.context.stage = rec.stage = stage
        rec.ops.__enter__()
