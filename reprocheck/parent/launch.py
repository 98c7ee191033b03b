"""N runs × legs, each run in its own process: legs planned, a spec per run, replays and
the measurement of what they kept (the processes themselves: :mod:`.schedule`).

The parent never imports user code. It writes one spec per run
(:class:`~reprocheck.contract.RunSpec`) for ``python -m reprocheck.child.worker SPEC``
with the leg's environment; the scheduler starts it, polls its trace for progress and —
with fail-fast — compares a leg's runs while they go.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint
from ..config import Config, config_to_dict
from ..contract import (
    HASH_THREAD_ENV,
    MAIN,
    Capture,
    Recipe,
    Recording,
    ResumeRun,
    RunSpec,
    Target,
    TorchrunJob,
)
from ..determinism import child_environment, torch_source
from . import pool
from .schedule import Scheduler, Task


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
    agreed: int | None = None  # fail-fast: the leg's runs found identical up to this step

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


def hash_beside(threads: int | None, jobs: int, processes: int = 1) -> bool:
    """Whether each run hashes its large tensors on a thread beside training
    (:data:`reprocheck.recorder.BESIDE_BYTES`): ``REPROCHECK_HASH_THREAD=1`` or ``0`` says;
    unset, where the runs going at once (``jobs`` of ``processes`` processes, ``threads``
    torch threads each) leave a core free for each process's thread. torch's default
    thread count (``threads`` None) takes every core. The digests are the same either way."""
    asked = os.environ.get(HASH_THREAD_ENV, "").strip()
    if asked in ("0", "1"):
        return asked == "1"
    if threads is None:
        return False
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    return cores - jobs * processes * threads >= jobs * processes


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
        recording: Recording | None = None,
    ) -> None:
        self.config = config
        # how the verdict's runs and those beside it record (sparse, sampled); replays: full
        self.recording = recording if recording is not None and not recording.plain else None
        self.checkpoints = checkpoints  # save states for replays (not for exec scripts)
        self.out_dir = Path(out_dir)
        self.with_sketch = with_sketch
        self.fail_fast = fail_fast
        self.depth = depth
        self.target: Target = target if target is not None else Recipe()  # what runs
        self.resumed: dict[int, int] = {}  # run → the step its last capture started from
        self._replays: dict[int, str] = {}  # run → the trace of its last capture
        self.replay_errors: dict[int, str] = {}  # run → why its last capture kept nothing
        self._config_dict = config_to_dict(config)
        self._analyses = 0  # measurements made in forks (their files' numbers)
        self._named = 0  # runs started by name (a resume audit's)
        # where forking is sound (see :mod:`.pool`): the runs of a replay, an attribution
        # control or a probe (``fork_runs``) fork from a warm zygote; of a verdict's runs,
        # run 0 of each leg starts a fresh interpreter (so every fork is compared against
        # one) and the others fork, unless REPROCHECK_POOL=all forks run 0 too
        self.fork_runs = fork_runs or pool.forks_audited_runs()
        # an attribution control's runs (compared with each other alone) may fork from a
        # zygote of another thread count (see :mod:`.pool`)
        self.any_threads = any_threads
        self.scheduler = Scheduler(
            jobs or default_jobs(config), timeout, progress, any_threads, config.steps
        )
        # what each run's hashing thread needs a core beside: the run's processes, and the
        # runs going at once — at most the jobs, and (set by :meth:`run`) at most the
        # verdict's runs, which the runs beside the verdict then also go by
        self._processes = self.target.nproc_per_node if isinstance(self.target, TorchrunJob) else 1
        self._at_once = self.scheduler.jobs

    def _spec(
        self, leg: Leg, run: int, suffix: str = "", stem: str | None = None, **extra: Any
    ) -> tuple[RunResult, str]:
        stem = stem or f"{leg.name}-r{run}{suffix}"
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
            hash_thread=hash_beside(leg.threads, self._at_once, self._processes),
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
        self._at_once = max(1, min(self.scheduler.jobs, total_runs))
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
                result, spec_path = self._spec(
                    leg, run, checkpoints=saves, recording=self.recording
                )
                results.setdefault(leg.name, []).append(result)
                fork = (run > 0 or self.fork_runs) and pool.usable(env, leg.device)
                tasks.append(Task(leg, result, spec_path, env, fork=fork))
        fresh = [task for task in tasks if not task.fork]
        forked = [task for task in tasks if task.fork]
        # the fresh runs first: their interpreters start while the zygotes warm up
        interrupted = False
        try:
            self.scheduler.execute(fresh + forked, self.config.steps, check_leg=self.fail_fast)
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
            tasks.append(Task(leg, result, spec_path, env, fork=fork))
            outputs[run] = out
        self.scheduler.execute(tasks, step, check_leg=False)
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
        specs = [
            self._spec(leg, self.config.repeats, suffix, **{"recording": self.recording, **extra})
            for suffix, extra in runs
        ]
        return self._side_by_side(leg, specs, until)

    def _side_by_side(
        self, leg: Leg, specs: Sequence[tuple[RunResult, str]], until: int
    ) -> list[RunResult]:
        """Runs beside the verdict's (each its result and spec), side by side, each forked
        where the pool serves, a trace left by an earlier run of that name removed first;
        ``until``: the step progress counts to."""
        env = self._environment(leg)
        tasks = []
        for result, spec_path in specs:
            if os.path.exists(result.trace):
                os.remove(result.trace)
            tasks.append(Task(leg, result, spec_path, env, fork=pool.usable(env, leg.device)))
        self.scheduler.execute(tasks, until, check_leg=False)
        return [task.result for task in tasks]

    def replays(
        self,
        leg: Leg,
        runs: Sequence[int],
        until: int,
        tag: str,
        recording: Recording | None = None,
        resume_before: int | None = None,
    ) -> dict[int, RunResult]:
        """Runs of ``leg`` replayed to step ``until`` whole (not a capture): ``recording``
        as asked (None: in full); a config's from its newest checkpoint at a step ≤
        ``resume_before`` that every run has (a script's from its start). run → result."""
        start = None
        if resume_before is not None and not self.target.is_script and self.checkpoints:
            found = [
                checkpoint.newest(self._checkpoint_prefix(leg, r), resume_before) for r in runs
            ]
            if all(found):
                step = min(f[0] for f in found if f)
                start = {
                    r: checkpoint.path_for(self._checkpoint_prefix(leg, r), step) for r in runs
                }
                if not all(os.path.exists(path) for path in start.values()):
                    start = None
        specs = []
        for run in runs:
            extra: dict[str, Any] = {"recording": recording}
            if self.target.is_script:
                extra["target"] = self.target.with_steps(until)
            else:
                extra["steps"] = until
                if start is not None:
                    extra["resume_run"] = ResumeRun(start_from=start[run])
            specs.append(self._spec(leg, run, f".{tag}", **extra))
        return dict(zip(runs, self._side_by_side(leg, specs, until)))

    def named_runs(
        self, leg: Leg, runs: Sequence[tuple[str, dict[str, Any]]], until: int
    ) -> list[RunResult]:
        """Runs of ``leg`` by name (a resume audit's ``reference``, ``stopped`` …), side by
        side: each (its name, what joins its spec: its target, its ``resume_run``), forked
        where the pool serves; ``until``: the step progress counts to."""
        specs = []
        for name, extra in runs:
            self._named += 1  # numbered in order: progress shows `reference #0`, `stopped #1`
            result, spec_path = self._spec(leg, self._named - 1, stem=name, **extra)
            result.leg = name
            specs.append((result, spec_path))
        return self._side_by_side(leg, specs, until)

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
                    code = process.wait(timeout=self.scheduler.timeout)
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
    def _environment(self, leg: Leg) -> dict[str, str]:
        """A run's environment: the controls' variables, then the leg's own."""
        env = child_environment(self.config.determinism, leg.threads)
        env.update(dict(leg.env))
        return env
