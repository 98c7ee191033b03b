"""N runs × legs, each run in its own process: scheduling, timeouts, progress, fail-fast.

The parent never imports user code. It writes one spec per run, starts
``python -m reprocheck.child.worker SPEC`` with the leg's environment, polls the
traces for progress, and — with fail-fast — compares a leg's runs while they go, stopping
the leg as soon as two of them disagree.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint
from ..config import Config, config_to_dict
from ..contract import EXIT_NO_SPACE, MAIN, Capture, Recipe, RunSpec, Target, child_traces
from ..determinism import child_environment, torch_source
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

POLL_S = 0.05
FAIL_FAST_EVERY_S = 0.5


@dataclass
class RunResult:
    """One run's outcome.

    ``status``: complete | failed | timeout | killed | stopped | config_error.
    """

    leg: str
    run: int
    trace: str
    log: str
    status: str = "pending"
    steps: int = 0  # committed steps, step 0 included
    error: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    log_tail: list[str] = field(default_factory=list)  # a failed run's last output lines
    # the traces of the Python processes the run started that trained: name → trace
    children: dict[str, str] = field(default_factory=dict)
    forked: bool = False  # started as a fork of a warm zygote (runner/pool.py), not fresh

    @property
    def last_step(self) -> int | None:
        return self.steps - 1 if self.steps else None

    @property
    def processes(self) -> dict[str, str]:
        """Every trace of the run by process name: ``main`` (the run's own), then its
        children in name order (``mp1``, ``rank0``, ``sub1``)."""
        return {MAIN: self.trace, **self.children}


@dataclass(frozen=True)
class Leg:
    """Runs under one environment: a device and a thread count. :func:`plan_legs` plans
    them (no runs); :meth:`Launcher.run` returns new ones holding the runs' results."""

    name: str
    device: str
    threads: int | None
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    runs: tuple[RunResult, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # variables set for this leg's runs
    compile: bool | None = None  # through torch.compile (True), eager (False), as built (None)


def leg_name(device: str, threads: int | None, environment: int = 0, compiled: bool = False) -> str:
    """``cpu``, ``cuda0-t4``; ``-compiled`` for a compile leg; ``-e1``, ``-e2`` … for the
    config's other environments."""
    return (
        device.replace(":", "")
        + (f"-t{threads}" if threads is not None else "")
        + ("-compiled" if compiled else "")
        + (f"-e{environment}" if environment else "")
    )


def _gpu_build() -> bool | None:
    """Whether the installed torch was built for CUDA or ROCm, read from its
    ``torch/version.py`` without importing torch (None: not readable there)."""
    import ast

    path = torch_source("version.py")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (ValueError, OSError, SyntaxError, UnicodeDecodeError):
        return None
    values: dict[str, Any] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
            values[target.id] = node.value.value
    if "cuda" not in values or "hip" not in values:
        return None
    return values["cuda"] is not None or values["hip"] is not None


def device_missing(device: str) -> str | None:
    """Why a device cannot run here, or None when it can. A CPU build of torch has no
    CUDA device, and only macOS has MPS: both are answered without importing torch."""
    if device.startswith("cuda") and _gpu_build() is False:
        return "no CUDA device"
    if device == "mps" and sys.platform != "darwin":
        return "no MPS device"
    if device == "cpu":
        return None
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "no CUDA device"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"no CUDA device {index} (have {torch.cuda.device_count()})"
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "no MPS device"
    return None


def plan_legs(config: Config) -> list[Leg]:
    """devices × threads × compile × environments; a leg whose device is absent is
    skipped with the reason."""
    legs = []
    for device in config.devices:
        missing = device_missing(device)
        for threads in config.threads:
            for compiled in config.compile:
                for index, env in enumerate(config.environments):
                    name = leg_name(device, threads, index, compiled)
                    status = "skipped" if missing else "ok"
                    legs.append(
                        Leg(name, device, threads, status, missing, env=env, compile=compiled)
                    )
    return legs


def default_jobs(config: Config) -> int:
    """Parallel runs that fit this machine: cores ÷ the largest thread count per run."""
    cores = os.cpu_count() or 1
    per_run = max((t or cores) for t in config.threads)
    return max(1, cores // per_run)


@dataclass
class _Task:
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


class Launcher:
    """Runs a config's legs. ``progress(result, steps_done, steps_total)`` is called on updates."""

    def __init__(
        self,
        config: Config,
        out_dir: str | os.PathLike,
        *,
        jobs: int | None = None,
        timeout: float | None = None,
        with_sketch: bool = False,
        fail_fast: bool = True,
        depth: str = "step",
        progress: Callable[[RunResult, int, int], None] | None = None,
        target: Target | None = None,
        checkpoints: bool = False,
        fork_runs: bool = False,
        any_threads: bool = False,
    ) -> None:
        self.config = config
        self.checkpoints = checkpoints  # save states for replays (not for exec scripts)
        self.out_dir = Path(out_dir)
        self.jobs = jobs or default_jobs(config)
        self.timeout = timeout
        self.with_sketch = with_sketch
        self.fail_fast = fail_fast
        self.depth = depth
        self.target: Target = target if target is not None else Recipe()  # what runs
        self.resumed: dict[int, int] = {}  # run → the step its last capture started from
        self._replays: dict[int, str] = {}  # run → the trace of its last capture
        self.replay_errors: dict[int, str] = {}  # run → why its last capture kept nothing
        self.progress = progress
        self._config_dict = config_to_dict(config)
        self._running: list[_Task] = []
        self._analyses = 0  # measurements made in forks (their files' numbers)
        self._verified: dict[tuple[str, ...], int] = {}  # fail-fast: steps known identical
        # where forking is sound (see :mod:`.pool`): the runs of a replay, an attribution
        # control or a probe (``fork_runs``) fork from a warm zygote; of a verdict's runs,
        # run 0 of each leg starts a fresh interpreter (so every fork is compared against
        # one) and the others fork, unless REPROCHECK_POOL=all forks run 0 too
        self.fork_runs = fork_runs or pool.forks_audited_runs()
        # an attribution control's runs (compared with each other alone) may fork from a
        # zygote of another thread count (see :mod:`.pool`)
        self.any_threads = any_threads

    def _spec(self, leg: Leg, run: int, suffix: str = "", **extra: Any) -> tuple[RunResult, str]:
        stem = f"{leg.name}-r{run}{suffix}"
        trace = self.out_dir / f"{stem}.sqlite"
        spec = RunSpec(
            config=self._config_dict,
            config_path=self.config.path,
            base_dir=os.path.abspath(self.config.base_dir),
            leg=leg.name,
            device=leg.device,
            threads=leg.threads,
            # None: no compile setting asked for (a script's own torch.compile runs as written)
            compile=leg.compile,
            run=run,
            steps=self.config.steps,
            trace=str(trace.resolve()),
            target=self.target,
            with_sketch=self.with_sketch,
            depth=self.depth,
        )
        spec = replace(spec, **extra)
        spec_path = self.out_dir / f"{stem}.spec.json"
        result = RunResult(leg.name, run, str(trace), str(self.out_dir / f"{stem}.log"))
        try:
            spec.write(str(spec_path))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            with contextlib.suppress(OSError):
                spec_path.unlink()  # half a spec
            result.status = "failed"  # never started (the scheduler passes it by)
            result.error = f"no space left on device while writing {spec_path}"
        return result, str(spec_path)

    def _checkpoint_prefix(self, leg: Leg, run: int) -> str:
        return str((self.out_dir / f"{leg.name}-r{run}.ckpt-").resolve())

    def replay_trace(self, run: int) -> str:
        """The trace the last :meth:`capture` of ``run`` recorded."""
        return self._replays[run]

    def run(self, legs: Sequence[Leg]) -> tuple[list[Leg], bool]:
        """Every run of every planned leg that is not skipped: (the legs with their runs,
        whether Ctrl-C stopped them — it stops them all)."""
        tasks = []
        results: dict[str, list[RunResult]] = {}
        total_runs = self.config.repeats * sum(leg.status != "skipped" for leg in legs)
        for leg in legs:
            if leg.status == "skipped":
                continue
            env = self._environment(leg)
            for run in range(self.config.repeats):
                saves = None
                if self.checkpoints and not self.target.is_script:
                    saves = checkpoint.plan(
                        self.config.steps, self._checkpoint_prefix(leg, run), total_runs
                    )
                result, spec_path = self._spec(leg, run, checkpoints=saves)
                results.setdefault(leg.name, []).append(result)
                fork = (run > 0 or self.fork_runs) and pool.usable(env, leg.device)
                tasks.append(_Task(leg, result, spec_path, env, fork=fork))
        fresh = [task for task in tasks if not task.fork]
        forked = [task for task in tasks if task.fork]
        # the fresh runs first: their interpreters start while the zygotes warm up
        interrupted = False
        try:
            self._execute(fresh + forked, self.config.steps, check_leg=self.fail_fast)
        except KeyboardInterrupt:
            interrupted = True
        ran = []
        for leg in legs:
            runs = tuple(results.get(leg.name, ()))
            failed = (
                not interrupted
                and leg.status != "skipped"
                and runs
                and all(r.status not in ("complete", "stopped") for r in runs)
            )
            ran.append(
                replace(leg, runs=runs, status="failed", reason=runs[0].error)
                if failed
                else replace(leg, runs=runs)
            )
        return ran, interrupted

    def capture(
        self,
        leg: Leg,
        runs: Iterable[int],
        step: int,
        tensors: Sequence[tuple[str, str]],
        ops: bool = False,
        attempt: int = 0,
        resume: bool = False,
        process: str = MAIN,
        backend: str | None = None,
    ) -> dict[int, str]:
        """Replay runs up to ``step`` and keep the named tensors' values: run → .pt path.

        ``backend``: a compiled leg's replay through this torch.compile backend instead
        (``aot_eager``: the ladder's middle rung).

        ``ops``: also capture every aten op of that step, to ``<path>.ops.json``.
        ``process``: the process of the run whose step is captured (a script's child).
        ``resume``: start each replay from the run's newest checkpoint at step ≤ ``step``−2
        (:mod:`.checkpoint`); :attr:`resumed` then says where each started (0: step 0).
        The caller proves a resume with :meth:`replay_trace` before trusting it.
        """
        env = self._environment(leg)
        tasks, outputs = [], {}
        self.resumed = {}
        for run in runs:
            tag = (
                f"s{step}"
                + (f"-{attempt}" if attempt else "")
                + ("-c" if resume else "")
                + (f"-{backend}" if backend else "")
            )
            out = str((self.out_dir / f"{leg.name}-r{run}.capture-{tag}.pt").resolve())
            prefix = self._checkpoint_prefix(leg, run)
            found = checkpoint.newest(prefix, step - 2) if resume else None
            capture = Capture(
                step=step,
                tensors=tuple((phase, tensor) for phase, tensor in tensors),
                out=out,
                ops=ops,
                process=process,
                backend=backend,
                resume=found[1] if found else None,
            )
            self.resumed[run] = found[0] if found else 0
            self._replays[run] = str(self.out_dir / f"{leg.name}-r{run}.replay-{tag}.sqlite")
            result, spec_path = self._spec(leg, run, f".replay-{tag}", capture=capture)
            for stale in (result.trace, out, out + ".ops.json"):
                if os.path.exists(stale):
                    os.remove(stale)
            # a replay's first pair forks; a pair that then agreed is retried fresh
            fork = attempt == 0 and pool.usable(env, leg.device)
            tasks.append(_Task(leg, result, spec_path, env, fork=fork))
            outputs[run] = out
        self._execute(tasks, step, check_leg=False)
        kept = {run: path for run, path in outputs.items() if os.path.exists(path)}
        self.replay_errors = {
            task.result.run: task.result.error
            or f"the replay ended ({task.result.status}) without capturing step {step}"
            for task in tasks
            if task.result.run not in kept
        }
        return kept

    def extra_runs(
        self, leg: Leg, runs: Sequence[tuple[str, dict[str, Any]]], until: int
    ) -> list[RunResult]:
        """More runs of ``leg`` beside the verdict's, never part of it (the canary, the
        observer), side by side: each (suffix, what joins its spec), numbered after the
        verdict's, forked where the pool serves; ``until``: the step progress counts to."""
        env = self._environment(leg)
        tasks = []
        for suffix, extra in runs:
            result, spec_path = self._spec(leg, self.config.repeats, suffix, **extra)
            if os.path.exists(result.trace):
                os.remove(result.trace)
            tasks.append(_Task(leg, result, spec_path, env, fork=pool.usable(env, leg.device)))
        self._execute(tasks, until, check_leg=False)
        return [task.result for task in tasks]

    def analyse(self, leg: Leg, request: dict[str, Any]) -> dict[str, Any]:
        """Measure what replays kept (:mod:`.analysis`) in a fork of the leg's zygote, or
        in this process where torch is imported already or no zygote can serve (this
        process then imports torch)."""
        env = self._environment(leg)
        if "torch" not in sys.modules and pool.usable(env, leg.device):
            self._analyses += 1
            stem = self.out_dir / f"{leg.name}.analysis-{self._analyses}"
            out = str(stem) + ".out.json"
            try:
                Path(str(stem) + ".json").write_text(json.dumps({**request, "out": out}), "utf-8")
            except OSError as exc:  # a full disk: measured here instead, where no file is needed
                if exc.errno != errno.ENOSPC:
                    raise
                with contextlib.suppress(OSError):
                    os.remove(str(stem) + ".json")
                process = None
            else:
                process = pool.spawn(
                    env, str(stem) + ".json", str(stem) + ".log", module="reprocheck.analysis"
                )
            if process is not None:
                try:
                    code = process.wait(timeout=self.timeout)
                except BaseException as exc:  # Ctrl-C, or a timeout: the fork goes with it
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(process.pid, signal.SIGKILL)
                    if not isinstance(exc, subprocess.TimeoutExpired):
                        raise
                    code = None
                if code == 0 and os.path.exists(out):
                    with open(out, encoding="utf-8") as handle:
                        answer = json.load(handle)
                    for done in (".json", ".out.json", ".log"):  # kept only if it failed
                        with contextlib.suppress(OSError):
                            os.remove(str(stem) + done)
                    return answer
        from .. import analysis

        return analysis.measure(request)

    # The scheduler: start up to `jobs` processes, poll them, enforce timeouts.
    def _execute(self, tasks: list[_Task], steps_total: int, check_leg: bool) -> None:
        queue = list(tasks)
        last_check = time.monotonic()
        for env in {pool.startup_key(t.env): t.env for t in tasks if t.fork}.values():
            pool.zygote(env, self.any_threads)  # warming from now: its forks wait, not others
        try:
            while queue or self._running:
                for task in list(queue):
                    if len(self._running) >= self.jobs:
                        break
                    if task.result.status in ("stopped", "failed"):  # (failed: never started)
                        queue.remove(task)
                    elif not (task.fork and pool.warming(task.env, self.any_threads)):
                        queue.remove(task)
                        self._start(task)
                running = len(self._running)
                for task in list(self._running):
                    self._poll(task, steps_total)
                if check_leg and time.monotonic() - last_check > FAIL_FAST_EVERY_S:
                    last_check = time.monotonic()
                    self._stop_divergent_legs(tasks, queue)
                if len(self._running) == running and (queue or self._running):
                    self._wait(queue)  # (a run that ended frees its place now)
        except BaseException:
            for task in list(self._running):
                self._kill(task, "interrupted", "interrupted (Ctrl-C) at step {step}")
            self._running = []
            raise

    def _wait(self, queue: list[_Task]) -> None:
        """Sleep until a run ends, a zygote says something (a fork's exit, its readiness)
        or :data:`POLL_S` passes: a run's end starts the next one at once."""
        fds = {task.exit_fd for task in self._running if task.exit_fd is not None}
        zygotes = {}
        for task in self._running + [t for t in queue if t.fork]:
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

    def _environment(self, leg: Leg) -> dict[str, str]:
        """A run's environment: the controls' variables, then the leg's own."""
        env = child_environment(self.config.determinism, leg.threads)
        env.update(dict(leg.env))
        return env

    def _start(self, task: _Task) -> None:
        if task.fork:
            task.process = pool.spawn(
                task.env, task.spec_path, task.result.log, any_threads=self.any_threads
            )
            if task.process is not None:
                pool.track(task.process.pid)  # (its session: the reaper's, if the audit dies)
                task.started = time.monotonic()
                task.result.status = "running"
                task.result.forked = True
                self._running.append(task)
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
        self._running.append(task)

    def _poll(self, task: _Task, steps_total: int) -> None:
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
        self._running.remove(task)
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

    def _kill(self, task: _Task, status: str, message: str) -> None:
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
        if task in self._running:
            self._running.remove(task)
        result = task.result
        result.steps = committed_steps(result.trace)
        result.children = child_traces(result.trace)
        result.status = status
        result.exit_code = task.process.returncode
        # `steps` committed means step `steps` was running (or, past the last, finishing)
        # (`exec` without --steps has config.steps 0: the script's own length is unknown)
        done = bool(self.config.steps) and result.steps > self.config.steps
        result.error = message.format(
            step=f"{self.config.steps} (its last)" if done else result.steps
        )
        if status == "timeout":  # a hang: the run's last output says where it was
            result.log_tail = log_tail(result.log, 12).split(" | ")
        if os.path.exists(result.trace):
            mark_ended(result.trace, "failed" if status != "stopped" else "stopped", result.error)

    def _stop_divergent_legs(self, tasks: list[_Task], queue: list[_Task]) -> None:
        """Fail-fast: once two runs of a leg disagree, stop the leg's other runs."""
        from ..compare import first_divergence

        by_leg: dict[str, list[_Task]] = {}
        for task in tasks:
            by_leg.setdefault(task.leg.name, []).append(task)
        for leg_tasks in by_leg.values():
            started = [t for t in leg_tasks if t.result.status not in ("pending", "stopped")]
            if len(started) < 2 or not any(t in self._running or t in queue for t in leg_tasks):
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
                continue
            for task in leg_tasks:
                if task in self._running:
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
