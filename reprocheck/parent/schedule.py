"""Runs as processes, side by side: starting them (fresh, or forked from a warm zygote),
watching their traces for progress, timeouts, how each ended, and fail-fast (once two
runs of a leg disagree, the leg's other runs stop). :class:`~.launch.Launcher` says what
runs; this module runs them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..contract import EXIT_NO_SPACE, MAIN, child_traces
from ..trace import (
    Trace,
    TraceError,
    _read_log,
    committed_steps,
    leave_wal,
    mark_ended,
    step_log_path,
)
from . import pool

if TYPE_CHECKING:
    from .launch import Leg, RunResult

POLL_S = 0.05
FAIL_FAST_EVERY_S = 0.5


@dataclass
class Task:
    leg: Leg
    result: RunResult
    spec_path: str
    env: dict[str, str]
    process: Any = None  # a subprocess.Popen, or a pool.PooledProcess
    started: float = 0.0
    fork: bool = False  # may start as a fork of the environment's zygote
    exit_fd: int | None = None  # readable once the process has ended (a pidfd, Linux)

    def watch(self) -> None:
        """Open the descriptor the scheduler waits on for this fresh process's exit."""
        with contextlib.suppress(AttributeError, OSError):  # no pidfd: polled every POLL_S
            self.exit_fd = os.pidfd_open(self.process.pid)

    def unwatch(self) -> None:
        if self.exit_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.exit_fd)
            self.exit_fd = None


class Scheduler:
    """Runs tasks, ``jobs`` at a time. ``progress(result, steps_done, steps_total)`` is
    called on updates; ``planned_steps``: the config's steps (0: a script's own length)."""

    def __init__(
        self,
        jobs: int,
        timeout: float | None,
        progress: Callable[[RunResult, int, int], None] | None,
        any_threads: bool,
        planned_steps: int,
    ) -> None:
        self.jobs = jobs
        self.timeout = timeout
        self.progress = progress
        self.any_threads = any_threads
        self.planned_steps = planned_steps
        self.running: list[Task] = []
        self._verified: dict[tuple[str, ...], int] = {}  # fail-fast: steps known identical

    def execute(self, tasks: list[Task], steps_total: int, check_leg: bool) -> None:
        queue = list(tasks)
        last_check = time.monotonic()
        for env in {pool.startup_key(t.env): t.env for t in tasks if t.fork}.values():
            pool.zygote(env, self.any_threads)  # warming from now: its forks wait, not others
        try:
            while queue or self.running:
                for task in list(queue):
                    if len(self.running) >= self.jobs:
                        break
                    if task.result.status in ("stopped", "failed"):  # (failed: never started)
                        queue.remove(task)
                    elif not (task.fork and pool.warming(task.env, self.any_threads)):
                        queue.remove(task)
                        self._start(task)
                running = len(self.running)
                for task in list(self.running):
                    self._poll(task, steps_total)
                if check_leg and time.monotonic() - last_check > FAIL_FAST_EVERY_S:
                    last_check = time.monotonic()
                    self._stop_divergent_legs(tasks, queue)
                if len(self.running) == running and (queue or self.running):
                    self._wait(queue)  # (a run that ended frees its place now)
        except BaseException:
            for task in list(self.running):
                self._kill(task, "interrupted", "interrupted (Ctrl-C) at step {step}")
            self.running = []
            raise

    def _wait(self, queue: list[Task]) -> None:
        """Sleep until a run ends, a zygote says something (a fork's exit, its readiness)
        or :data:`POLL_S` passes: a run's end starts the next one at once."""
        fds = {task.exit_fd for task in self.running if task.exit_fd is not None}
        zygotes = {}
        for task in self.running + [t for t in queue if t.fork]:
            found = pool.registered(task.env, self.any_threads) if task.fork else None
            fd = found.fileno() if found is not None else None
            if fd is not None:
                zygotes[fd] = found
        if not fds and not zygotes:
            time.sleep(POLL_S)
            return
        try:
            waiting = select.poll()  # (no limit on descriptor numbers, unlike select())
            for fd in [*fds, *zygotes]:
                waiting.register(fd, select.POLLIN)
            readable = [fd for fd, _ in waiting.poll(POLL_S * 1000)]
        except (OSError, ValueError, AttributeError):  # no poll(), or a descriptor gone
            time.sleep(POLL_S)
            return
        for fd in readable:
            if fd in zygotes:
                zygotes[fd].pump()  # read what it said, so the next wait does not wake on it

    def _start(self, task: Task) -> None:
        if task.fork:
            task.process = pool.spawn(
                task.env, task.spec_path, task.result.log, any_threads=self.any_threads
            )
            if task.process is not None:
                pool.track(task.process.pid)  # (its session: the reaper's, if the audit dies)
                task.started = time.monotonic()
                task.result.status = "running"
                task.result.forked = True
                self.running.append(task)
                return
        try:
            log = open(task.result.log, "wb")  # noqa: SIM115 - handed to the child, closed on exit
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            task.result.status = "failed"  # never started: the disk is full
            task.result.error = f"no space left on device while writing {task.result.log}"
            return
        task.process = subprocess.Popen(
            [task.env.get(pool.PYTHON_ENV) or sys.executable, "-m", "reprocheck.child.worker"]
            + [task.spec_path],
            env=pool.audit_env(task.env),  # it dies with the audit, and what it starts too
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the parent, which stops the children
        )
        log.close()
        pool.track(task.process.pid)
        task.watch()
        task.started = time.monotonic()
        task.result.status = "running"
        self.running.append(task)

    def _poll(self, task: Task, steps_total: int) -> None:
        result = task.result
        assert task.process is not None
        code = task.process.poll()
        result.steps = committed_steps(result.trace)
        result.seconds = time.monotonic() - task.started
        if self.progress:
            self.progress(result, max(0, result.steps - 1), steps_total)
        if code is None:
            if self.timeout and result.seconds > self.timeout:
                self._kill(task, "timeout", f"timed out after {self.timeout:g} s at step {{step}}")
            return
        self.running.remove(task)
        task.unwatch()
        pool.untrack(task.process.pid)
        result.exit_code = code
        self._settle(result, code)
        if self.progress:
            self.progress(result, max(0, result.steps - 1), steps_total)

    def _settle(self, result: RunResult, code: int) -> None:
        """Read how the run ended from its trace (or its log, if it never wrote one)."""
        result.children = child_traces(result.trace)
        for path in result.processes.values():
            leave_wal(path)
        try:
            with Trace(result.trace, own=True) as trace:
                result.steps = len(trace.steps)
                status, error, kind = trace.status, trace.error, trace.run_meta.error_kind
        except TraceError:
            status, error, kind = "running", None, None
        result.steps = max(result.steps, kept_steps(result.trace))  # (a log left unfolded)
        if not result.steps:  # the script's process only launched (torchrun, mp.spawn)
            children = [p for name, p in result.processes.items() if name != MAIN]
            result.steps = max((kept_steps(p) for p in children), default=0)
        if not (status == "complete" and code == 0):
            result.log_tail = log_tail(result.log, 12).split(" | ")
        if status == "complete" and code == 0:
            result.status = "complete"
        elif code == EXIT_NO_SPACE:  # its trace's disk is full: it may not have said so there
            result.status = "failed"
            result.error = error or f"no space left on device while writing {result.trace}"
        elif kind == "config" or code == 2:
            result.status = "config_error"
            result.error = error or log_tail(result.log)
        elif status == "failed":
            result.status = "failed"
            result.error = _first_failed_child(result) or error
        else:  # the process died without saying why: a signal, or an error before the trace
            result.status = "killed" if code < 0 else "failed"
            why = f"killed by {signal_name(-code)}" if code < 0 else f"exited with status {code}"
            result.error = _first_failed_child(result) or (
                f"{why} at step {result.steps}: {log_tail(result.log)}".rstrip(": ")
            )
            if os.path.exists(result.trace):
                mark_ended(result.trace, "failed", result.error)

    def _kill(self, task: Task, status: str, message: str) -> None:
        assert task.process is not None
        # processes that left the run's group (torchrun starts each rank in a session of
        # its own), found before their parent dies and they are re-parented
        descendants = _descendants(task.process.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(task.process.pid, signal.SIGKILL)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if task.result.forked:  # a fork not yet in its own group (setsid) is killed alone
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(task.process.pid, signal.SIGKILL)
        task.process.wait()
        task.unwatch()
        pool.untrack(task.process.pid)
        if task in self.running:
            self.running.remove(task)
        result = task.result
        result.steps = committed_steps(result.trace)
        result.children = child_traces(result.trace)
        result.status = status
        result.exit_code = task.process.returncode
        # `steps` committed means step `steps` was running (or, past the last, finishing)
        # (`exec` without --steps has config.steps 0: the script's own length is unknown)
        done = bool(self.planned_steps) and result.steps > self.planned_steps
        result.error = message.format(
            step=f"{self.planned_steps} (its last)" if done else result.steps
        )
        if status == "timeout":  # a hang: the run's last output says where it was
            result.log_tail = log_tail(result.log, 12).split(" | ")
        if os.path.exists(result.trace):
            mark_ended(result.trace, "failed" if status != "stopped" else "stopped", result.error)

    def _stop_divergent_legs(self, tasks: list[Task], queue: list[Task]) -> None:
        """Fail-fast: once two runs of a leg disagree, stop the leg's other runs."""
        from ..compare import first_divergence

        by_leg: dict[str, list[Task]] = {}
        for task in tasks:
            by_leg.setdefault(task.leg.name, []).append(task)
        for leg_tasks in by_leg.values():
            started = [t for t in leg_tasks if t.result.status not in ("pending", "stopped")]
            if len(started) < 2 or not any(t in self.running or t in queue for t in leg_tasks):
                continue
            traces = tuple(t.result.trace for t in started)
            # steps every started run has committed, and those already found identical
            common = min(committed_steps(path) for path in traces) - 1
            verified = self._verified.get(traces, -1)
            if common <= verified:
                continue
            if (
                first_divergence(list(traces), partial=True, from_step=verified + 1, own=True)
                is None
            ):
                self._verified[traces] = common
                for task in started:  # the progress says how far the runs agree
                    task.result.agreed = common
                continue
            for task in leg_tasks:
                if task in self.running:
                    self._kill(task, "stopped", "stopped by fail-fast at step {step}")
                elif task in queue:
                    queue.remove(task)
                    task.result.status = "stopped"
                    task.result.error = "not started: the leg had already diverged (fail-fast)"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux: read from /proc; elsewhere none are found)."""
    parents: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kept_steps(path: str) -> int:
    """The steps a finished run's trace kept, exactly: those committed to SQLite and the
    whole frames of a step log its writer could not fold (a full disk leaves it there, and
    a reader cannot fold it either). 0 when there is no trace."""
    steps: set[int] = set()
    with contextlib.suppress(TraceError), Trace(path, own=True) as trace:
        steps.update(trace.steps)
    with contextlib.suppress(OSError):
        fd = os.open(step_log_path(path), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            steps.update(logged.step for logged in _read_log(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    return len(steps)


def _first_failed_child(result: RunResult) -> str | None:
    """``rank1: RuntimeError: … (train.py:72 in _run_batch)``: the error of the child
    process that failed first (a rank that raised; the others then fail in the collective
    it left, or are stopped by their launcher), when one raised."""
    failed = []
    for name, path in result.processes.items():
        if name == MAIN or not os.path.exists(path):
            continue
        with contextlib.suppress(TraceError), Trace(path, own=True) as trace:
            if trace.status == "failed" and trace.error:
                failed.append((trace.run_meta.failed_at or float("inf"), name, trace.error))
    if not failed:
        return None
    _, name, error = min(failed)
    return f"{name}: {error}"


def log_tail(path: str, lines: int = 1) -> str:
    """The last non-empty lines of a run's output (its error, usually)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = [line.rstrip() for line in handle if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])
