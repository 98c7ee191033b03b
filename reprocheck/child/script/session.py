"""What every recording process of one run shares (:class:`Session`)."""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import torch

from ...config import PHASES
from ...contract import Capture, ChildSettings, process_trace
from ..context import RunContext
from .naming import Created
from .processes import _in_dataloader_worker, process_key
from .recorder import ProcessRecorder


class Session:
    """What every recording process of one run shares: where traces go, the controls,
    the step limit. The script's own process creates it from the launcher's spec; a child
    process from the settings its parent left in the environment
    (:mod:`reprocheck.child.spawned`)."""

    def __init__(self, settings: ChildSettings) -> None:
        self.settings = settings
        self.trace = settings.trace
        self.max_steps = settings.max_steps
        self.with_sketch = settings.with_sketch
        # a replay (the zoom): keep the named tensors of step k, and every op of it
        self.capture: Capture | None = settings.capture
        self.recorders: dict[int, ProcessRecorder | None] = {}  # pid → its recorder
        self.subprocesses = itertools.count(1)
        self.seeding: dict[int, list[dict[str, Any]]] = {}  # pid → its seeding calls
        self.written: dict[int, set[str]] = {}  # pid → the files it opened for writing
        # pid → the script's own calls that set a control (threads, deterministic algorithms)
        self.overrides: dict[int, list[dict[str, Any]]] = {}
        self.created = Created()  # modules and optimizers, by identity, in creation order
        # a compile leg (``--compile``): None (not asked: the script runs as written), False
        # (torch.compile returns its argument unchanged) or True (the script's compile
        # runs; a model the script never compiles is compiled in place with its optimizer)
        self.compile_mode: bool | None = settings.compile
        self.compile_backend: str | None = settings.compile_backend
        self.cache_warm: bool | None = None
        if self.compile_mode:
            from ...determinism import compile_cache_warm

            self.cache_warm = compile_cache_warm()
        self.compile_calls: list[str] = []  # where the script called torch.compile
        self.compile_options: list[dict[str, Any]] = []  # those with a mode or options
        self.compiled_in_place: set[int] = set()  # models whose forward --compile on compiled
        self.original_compile: Callable[..., Any] = torch.compile
        from .saves import Saves

        self.saves = Saves(self)  # a resume audit's checkpoints, stop and control

    def window(self, key: str) -> Capture | None:
        """A replay's capture, if it is this process's (``main``, or the child that
        diverged: ``spawn1``, ``rank0`` …)."""
        capture = self.capture
        return capture if capture and capture.process == key else None

    def recorder(self) -> ProcessRecorder | None:
        """This process's recorder; a child that trains gets one (and a trace) now."""
        pid = os.getpid()
        found = self.recorders.get(pid, False)
        if found is False:
            found = None if _in_dataloader_worker() else ProcessRecorder(self, process_key())
            self.recorders[pid] = found
        return found

    def context(self, key: str, path: str | None = None) -> RunContext:
        """The run context (trace and step recorder) of this process, named ``key``."""
        from ...determinism import environment_snapshot

        env = os.environ
        meta = {
            **self.settings.meta,
            "process": key,
            "rank": int(env["RANK"]) if "RANK" in env else None,
            "local_rank": int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None,
            "world_size": int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None,
            "steps_planned": self.max_steps,
            "environment": environment_snapshot(self.settings.applied),
            # a spawned child's generators at its start (a fork's are its parent's: unknown)
            "rng_start": self.settings.rng_start,
            # a compile leg: was inductor's cache warm when this process started
            "compile_cache_warm": self.cache_warm,
        }
        path = path or process_trace(self.trace, key)
        window = self.window(key)
        return RunContext(
            path,
            meta,
            # a script's collectives, where it makes any; the observer run (reprocheck's
            # check that recording leaves training alone): weights and optimizer alone
            tuple(self.settings.record or (*PHASES, "comm")),
            with_sketch=self.with_sketch,
            capture=(window.step, window.tensors) if window else None,
        )

    def finish_all(self, status: str) -> None:
        rec = self.recorders.get(os.getpid())
        if rec is not None:
            rec.finish(status)
