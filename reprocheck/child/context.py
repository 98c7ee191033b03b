"""One run, in its process: the context every driver shares.

A *driver* says where a run's steps begin and end — the config loop
(:mod:`reprocheck.child.loop`), the script hooks (:mod:`reprocheck.child.script`),
the Python API (:class:`reprocheck.Recorder`). The context owns the rest, once: the trace
(its meta, its status, how it finishes), the step recorder with its capture window, and
what an error becomes — a failed trace with its error line and exit status 3, a config
error with exit 2, a script's ``sys.exit(n)`` with the status it gave, a full disk under
the trace with "no space left on device while writing TRACE" and
:data:`~reprocheck.child.worker.EXIT_NO_SPACE` (the trace may not take even that).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any, Callable

from ..config import ConfigError
from ..contract import Capture, Recording, RunMeta, capture_key
from ..fingerprint import hasher_name
from ..recorder import StepRecorder
from ..trace import TraceFull, TraceWriter
from ..verdict import EXIT_FAILED, EXIT_USAGE
from .worker import EXIT_NO_SPACE, quiet_output

EXIT_OK = 0


class StepLimitReached(SystemExit):
    """Raised after the last requested step: ends the run like ``sys.exit(0)``."""


def error_line(exc: BaseException) -> str:
    """``RuntimeError: planted crash at step 3 (reprocheck/zoo/planted.py:61 in forward)``."""
    from ..localize import user_frame

    frame = user_frame(traceback.extract_tb(exc.__traceback__))
    where = f" ({display_line(frame.filename, frame.lineno)} in {frame.name})" if frame else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def display_path(path: str) -> str:
    """A path relative to the working folder when it is below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def display_line(filename: str, lineno: int) -> str:
    """``train.py:42``; a notebook cell's line (:mod:`reprocheck.notebook`'s filename
    ``/abs/HW01.ipynb#cell7``) as ``HW01.ipynb · cell 7, line 12``."""
    from ..notebook import cell_of

    cell = cell_of(filename)
    if cell is not None:
        return f"{display_path(cell[0])} · cell {cell[1]}, line {lineno}"
    return f"{display_path(filename)}:{lineno}"


class RunContext:
    """The trace and step recorder of one run (or one process of a run).

    ``meta`` is what the driver knows of the run (:attr:`reprocheck.contract.RunSpec.meta`);
    the context adds the phases, the depth, whether sketches are taken and, at
    :meth:`finish`, the records written and the hasher each device's tensors went
    through (``hashers``).
    """

    def __init__(
        self,
        trace: str | os.PathLike,
        meta: dict[str, Any],
        phases: Iterable[str],
        *,
        with_sketch: bool = False,
        depth: str = "step",
        capture: tuple[int, Iterable[tuple[str, str]]] | None = None,
        extra_phases: Iterable[str] = (),
    ) -> None:
        phases = tuple(phases)
        known = RunMeta.of(meta)
        # a replay records in full, whatever the run it repeats recorded
        recording = Recording.of(known.recording) if capture is None else Recording()
        with_sketch = with_sketch and recording.mode == "full"  # sparse: no tensor to sketch
        self.writer = TraceWriter(
            trace,
            {
                **meta,
                "pid": os.getpid(),
                "phases": list(phases),
                "depth": depth,
                "sketches": with_sketch,
                "hasher": known.hasher or hasher_name(known.device or "cpu"),
            },
        )
        self.recorder = StepRecorder(
            self.writer,
            phases + tuple(extra_phases),
            with_sketch=with_sketch,
            capture=capture,
            recording=recording,
            last=known.steps_planned,
            hash_thread=bool(known.hash_thread),
        )
        if known.hash_thread and not self.recorder.beside:
            # asked for, but not done: sketches or the device digest take the careful way,
            # and a torch before 2.3 has no copy-on-write alias; the trace says what was done
            self.writer.set_meta(hash_thread=False)
        self.finished = False
        # the driver's last word before the trace closes: given the status, it may record
        # what is still pending and returns meta to store (a script's models, say)
        self.on_finish: Callable[[str], dict[str, Any]] | None = None

    @property
    def step_in_progress(self) -> int:
        """The step a failure happened in: the one after the last committed."""
        last = self.recorder.last_committed
        return 0 if last is None else last + 1

    def finish(self, status: str = "complete", error: str | None = None, **meta: Any) -> None:
        """Write the trace's final status, once."""
        if self.finished:
            return
        if self.on_finish is not None:
            with contextlib.suppress(TraceFull):  # (what it records the full disk refuses)
                meta = {**self.on_finish(status), **meta}
        with contextlib.suppress(TraceFull):
            self.recorder.drain()  # the step still hashed beside training
        self.finished = True
        if self.writer.full is not None:  # whatever else happened, the run ends with its cause
            status, error = "failed", str(self.writer.full)
            meta.update(error_kind="no_space")
            meta.setdefault("failed_step", self.step_in_progress)
        from ..determinism import package_versions

        meta.setdefault("packages", package_versions())  # what the run imported, versioned
        meta.setdefault("compiled", self.recorder.compiled)  # the model ran torch.compile'd
        if self.recorder.compiled:
            from ..determinism import compile_settings

            meta.setdefault("compile_settings", compile_settings())
        devices = sorted(self.recorder.devices)
        hashers = {device: hasher_name(device) for device in devices}
        accelerator = next((d for d in devices if d != "cpu"), None)
        if accelerator is not None:  # the hasher the model's tensors went through
            meta.setdefault("hasher", hashers[accelerator])
        with contextlib.suppress(TraceFull):  # (the trace says what it could; the status the rest)
            self.writer.finish(
                status, error, records=self.recorder.records, hashers=hashers, **meta
            )

    def fail(self, exc: BaseException) -> int:
        """The run raised: its traceback to the log, its error line to the trace; exit 3
        (2 for a config error the run met: a factory that returned the wrong thing)."""
        if isinstance(exc, ConfigError):
            self.finish("failed", f"config error: {exc}", error_kind="config")
            with contextlib.suppress(OSError):  # (a log on a full disk)
                print(f"reprocheck: config error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        with contextlib.suppress(OSError):
            traceback.print_exc()
        kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else "exception"
        self.finish(
            "failed",
            error_line(exc),
            error_kind=kind,
            failed_step=self.step_in_progress,
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[
                -8000:
            ],
        )
        return EXIT_FAILED

    def save_capture(self, capture: Capture, ops: list[Any]) -> None:
        """A replay's capture: the kept tensors (``.pt``) and, for a zoom, every op of the
        step (``.ops.json``) and what ran it (``.env.json``)."""
        import torch

        from .. import jsonout
        from ..localize import to_json

        recorder = self.recorder
        torch.save(
            {capture_key(*record): tensor for record, tensor in recorder.captured.items()},
            capture.out,
        )
        if capture.backend == "reprocheck-digest":  # the compiled graphs' outputs
            from ..compiled import RECORDS

            with open(capture.out + ".graphs.json", "w", encoding="utf-8") as handle:
                jsonout.dump(RECORDS, handle)
        if capture.ops:
            with open(capture.out + ".ops.json", "w", encoding="utf-8") as handle:
                jsonout.dump(to_json(ops), handle)
            with open(capture.out + ".env.json", "w", encoding="utf-8") as handle:
                jsonout.dump({"compiled": recorder.compiled}, handle)

    def run(self, body: Callable[[], Any]) -> int:
        """Run the driver's ``body``; the trace then says how it ended, and the result is
        the process's exit status (:data:`EXIT_NO_SPACE` once the trace's disk was full,
        whatever the script made of the error: the launcher says why from that alone)."""
        code = self._run(body)
        if self.writer.full is not None:
            quiet_output()  # the log is on that disk too: the exit must not fail flushing it
            return EXIT_NO_SPACE
        return code

    def _run(self, body: Callable[[], Any]) -> int:
        try:
            body()
        except SystemExit as exc:  # the script's own sys.exit, or the step limit
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if status and not isinstance(exc, StepLimitReached):
                self.finish(
                    "failed",
                    f"{getattr(exc, 'who', 'the script')} exited with status {exc.code}",
                    error_kind="exit",
                    failed_step=self.step_in_progress,
                )
                return EXIT_FAILED
        except BaseException as exc:
            return self.fail(exc)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except OSError:  # the log's disk is full
                quiet_output()
        self.finish("complete")
        return EXIT_OK
