"""One audit, start to finish: plan the legs, run them, find the first divergence, measure
it on the real tensors, compare the legs, and assemble the report.

This is what ``reprocheck run`` calls; the CLI only parses, renders and exits.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import checkpoint
from ..compare import (
    Divergence,
    LegComparison,
    Tolerance,
    compare_sketches,
    first_divergence,
    first_mismatch,
)
from ..config import Config
from ..contract import (
    AS_IS_ENV,
    CANARY_ENV,
    OBSERVER_ENV,
    Canary,
    Function,
    Recipe,
    Target,
    TorchrunJob,
    capture_key,
)
from ..doctor import rules
from ..options import DEFAULT_OUT, DEPTHS
from ..replicas import check_legs
from ..replicas import finding as replica_finding
from ..trace import Trace, TraceError, committed_steps
from .launch import Launcher, Leg, RunResult, plan_legs
from .stages import Evidence, Latent, Measurement

if TYPE_CHECKING:
    from ..golden import GoldenCheck

MIN_FREE_BYTES = 16 * 2**20


class OutputError(Exception):
    """The output folder cannot be written: said before any run starts."""


@dataclass
class AuditOptions:
    out: str = DEFAULT_OUT
    jobs: int | None = None
    timeout: float | None = None
    fail_fast: bool = True
    measure: bool = True  # replay the divergent step to diff the real tensors
    depth: str = DEPTHS[0]  # step | module | op: what each run records
    zoom: bool = True  # after a divergence, replay the step at op depth (localize.py)
    attribute: bool = True  # after a divergence, find the control that fixes it (doctor)
    sketch: bool = False  # numeric sketches in every trace (golden traces); else only across legs
    target: Target = field(default_factory=Recipe)  # what each run executes
    golden: str | None = None  # `reprocheck check`: compare run 0 with this golden trace
    any_config: bool = False  # ... even when it is another config's
    # the runs may fork from a warm zygote (runner/pool.py): an attribution control's or a
    # probe's audit, never the verdict's own runs
    fork_runs: bool = False
    # ... from one of another thread count (an attribution control's two runs are
    # compared with each other alone; a probe compares thread counts: never)
    any_threads: bool = False
    # a script's reproducible verdict under a preset: two more runs as its user runs it
    # (no preset, the user's environment), a warning (RC030) where they differ
    as_is: bool = field(default_factory=lambda: os.environ.get(AS_IS_ENV, "1") != "0")
    # a reproducible verdict: one more run with one bit flipped after a step, which the
    # comparison must find exactly there (reprocheck.canary); else NOT VERIFIED
    canary: bool = field(default_factory=lambda: os.environ.get(CANARY_ENV, "1") != "0")
    # ... and one that records only the weights and optimizer state, which must end where
    # the recorded runs did (recording left training alone); else NOT VERIFIED
    observer: bool = field(default_factory=lambda: os.environ.get(OBSERVER_ENV, "1") != "0")
    confidence: float = 0.95  # of the evidence's bound on the divergence rate
    max_rate: float | None = None  # --max-rate: the bound the runs were asked to reach


class Auditor:
    """What the doctor's probes and attribution rerun, handed to them (they import no
    runner): a whole audit of a config variant, or one step's op capture. ``target``: what
    each run executes (a script's, or a config's own recipe)."""

    def __init__(self, target: Target | None = None, any_threads: bool = False) -> None:
        self.target: Target = target if target is not None else Recipe()
        self.any_threads = any_threads  # attribution's controls: see AuditOptions

    def _target(self, config: Config, out: str | os.PathLike) -> Target:
        # a script's run ends after the variant's steps (0: the script's own length); its
        # `{run}` is prefixed with the folder's name (`as-is-cpu-r0`, `control-0-cpu-r0`),
        # so it never names a folder a run of the audit itself (`cpu-r0`) wrote
        if not self.target.is_script:
            return self.target
        return self.target.with_steps(config.steps or None).prefixed(f"{Path(out).name}-")

    def audit(self, config: Config, out: str | os.PathLike, fail_fast: bool = True) -> dict:
        """The report of an audit of ``config`` into ``out``: no replay, no attribution."""
        options = AuditOptions(
            out=str(out),
            measure=False,
            zoom=False,
            attribute=False,
            fail_fast=fail_fast,
            target=self._target(config, out),
            fork_runs=True,
            any_threads=self.any_threads,
            as_is=False,
            canary=False,
            observer=False,
        )
        return run_audit(config, options)

    def capture_ops(self, config: Config, folder: str | os.PathLike) -> tuple[str | None, str]:
        """Run 0 of the config's first leg, with every aten op of step 1 captured: (the
        capture's path, or None if the run failed; the replay's trace)."""
        leg = plan_legs(config)[0]
        launcher = Launcher(
            config,
            folder,
            fail_fast=False,
            target=self._target(config, folder),
            fork_runs=True,
        )
        paths = launcher.capture(leg, [0], 1, [], ops=True)
        return paths.get(0), launcher.replay_trace(0)


def make_audit_dir(out: str, name: str) -> Path:
    """A new folder for this audit's traces; two audits never share one."""
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable — choose another with --out")
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise OutputError(f"output folder {out} has only {free // 1024} KiB free — free some space")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "audit"
    for attempt in range(1000):
        folder = root / (f"{safe}-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            folder.mkdir()  # atomic: the one that creates it owns it
            return folder
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {out}: {exc.strerror or exc}") from None
    raise OutputError(f"could not find a free folder name in {out}")


def _process_runs(leg: Leg) -> dict[str, list[RunResult]]:
    """Each process name → the leg's runs that have its trace, in run order."""
    names: dict[str, list[RunResult]] = {}
    for run in leg.runs:
        for name in run.processes:
            names.setdefault(name, []).append(run)
    return names


def _traces(runs: list[RunResult], process: str) -> tuple[list[str], list[int]]:
    chosen = [r for r in runs if os.path.exists(r.processes.get(process, ""))]
    return [r.processes[process] for r in chosen], [r.run for r in chosen]


def _leg_divergence(leg: Leg) -> Divergence | None:
    """The first observable divergence among the leg's runs, process by process (rank r of
    one run against rank r of the others); a process one run has and another lacks is a
    divergence of structure at its first step."""
    found: list[Divergence] = []
    for process, runs in _process_runs(leg).items():
        traces, ids = _traces(runs, process)
        if len(traces) >= 2:
            divergence = first_divergence(traces, ids, partial=True, own=True)
            if divergence is not None:
                found.append(replace(divergence, leg=leg.name, process=process))
        ended = [r for r in leg.runs if r.status in ("complete", "stopped")]
        if process != "main" and len(runs) < len(ended):
            found.append(_missing_process(leg, process, runs, ended))
    return min(found, key=lambda d: (d.step, d.seq), default=None)


def _missing_process(
    leg: Leg, process: str, having: list[RunResult], ended: list[RunResult]
) -> Divergence:
    have = [r.run for r in having]
    lack = [r.run for r in ended if r.run not in have]
    return Divergence(
        step=0,
        seq=0,
        phase="process",
        tensor=process,
        shape=(),
        dtype="",
        runs=[have, lack],
        sides=[None, None],
        kind="structure",
        leg=leg.name,
        process=process,
    )


def _leg_latent(leg: Leg, process: str, last_step: int | None) -> Divergence | None:
    """The first generator state that differs between the leg's runs (of one process),
    at or before ``last_step``."""
    traces, ids = _traces(_process_runs(leg).get(process, []), process)
    if len(traces) < 2:
        return None
    found = first_divergence(traces, ids, partial=True, latent=True, last_step=last_step, own=True)
    return replace(found, leg=leg.name, process=process) if found is not None else None


def _generator(latent: Divergence) -> dict[str, Any]:
    return {
        "name": latent.tensor,
        "step": latent.step,
        "runs": latent.runs,
        "process": latent.process,
    }


def _trained(leg: Leg) -> bool:
    """Some process of some run committed a training step (step 1 or later)."""
    for run in leg.runs:
        for path in run.processes.values():
            if committed_steps(path) > 1:
                return True
    return False


ZOOM_ATTEMPTS = 3  # replays of a divergent step before calling it intermittent


def _evidence(leg: Leg, first: Divergence) -> Evidence:
    traces, ids = _traces(leg.runs, first.process)
    reached = [(t, i) for t, i in zip(traces, ids) if committed_steps(t) > first.step]
    cause = _leg_latent(leg, first.process, first.step)
    if cause is not None:
        cause = _drawn_cause(traces, ids, cause, first.step)
    return Evidence(
        variability=tuple(
            variability([t for t, _ in reached], [i for _, i in reached], first.step)
        ),
        generator=_generator(cause) if cause is not None else None,
        **_seeding_evidence(leg, cause),
    )


def _rng_digests(path: str, step: int) -> tuple[dict[str, bytes], dict[str, str] | None]:
    """The generator states a trace recorded at ``step`` (name → digest), and those its
    script started with (``meta.rng_start``, hex; None where unknown)."""
    with Trace(path, own=True) as trace:
        states = {r.name: r.digest for r in trace.records(step) if r.phase == "rng"}
        return states, trace.run_meta.rng_start


def _drawn_cause(
    traces: list[str], ids: list[int], latent: Divergence, step: int
) -> Divergence | None:
    """Of the generators that differ between the runs by ``step``, the first one the
    script moved (drawn from, or re-seeded, since its first line): a generator seeded
    from entropy that nothing touches (NumPy's, under ``--preset none``) explains nothing
    and stays a latent difference. Where the start is unknown (a config's run, a forked
    child), every differing generator counts."""
    states = [_rng_digests(path, step) for path in traces]
    for name in states[0][0]:
        differs = len({at_step.get(name) for at_step, _ in states}) > 1
        moved = any(
            start is None or start.get(name) != at_step[name].hex()
            for at_step, start in states
            if name in at_step
        )
        if not (differs and moved):
            continue
        if name == latent.tensor:
            return latent
        # no generator differs before the first one that does (``latent.step``)
        since = next(
            s
            for s in range(latent.step, step + 1)
            if len({_rng_digests(p, s)[0].get(name) for p in traces}) > 1
        )
        groups: dict[bytes | None, list[int]] = {}
        for run, (at_step, _) in zip(ids, states):
            groups.setdefault(at_step.get(name), []).append(run)
        return replace(latent, tensor=name, step=since, runs=list(groups.values()))
    return None


# which calls seed which generator (as the rng phase names them)
_SEEDS = {
    "torch.cpu": ("torch.manual_seed", "torch.seed"),
    "torch.cuda": ("torch.manual_seed", "torch.seed", "torch.cuda."),
    "numpy": ("np.random.seed",),
    "random": ("random.seed",),
}
_GENERATORS = {
    "torch.cpu": "torch's CPU generator",
    "torch.cuda": "torch's CUDA generator",
    "numpy": "NumPy's global generator",
    "random": "Python's random",
}


def _seeding_evidence(leg: Leg, cause: Divergence | None) -> dict[str, Any]:
    """Evidence's ``seeding`` (what to say) and ``seeding_call`` (the call, for the fix)."""
    text, call = _seeding(leg, cause) if cause is not None else (None, None)
    return {"seeding": text, "seeding_call": call}


def _seeding_calls(
    leg: Leg, divergence: Divergence
) -> list[tuple[list[dict[str, Any]], bool]] | None:
    """The seeding calls the first run of each of the divergence's first two groups
    recorded (``meta.seeding``) in its process, each with whether that run completed;
    None where a trace cannot say (unreadable, or the calls never written)."""
    by_run = {run.run: run for run in leg.runs}
    found = []
    for group in divergence.runs[:2]:
        try:
            with Trace(by_run[group[0]].processes[divergence.process], own=True) as trace:
                seeding, complete = trace.run_meta.seeding, trace.status == "complete"
        except (TraceError, KeyError):
            return None
        if not isinstance(seeding, list):  # never written: nothing can be said of it
            return None
        found.append(([c for c in seeding if isinstance(c, dict)], complete))
    return found


def _seeding(leg: Leg, latent: Divergence) -> tuple[str | None, dict[str, Any] | None]:
    """The seeding call that made a generator differ between two runs, from the calls
    each run's trace recorded (``meta.seeding``): (what to say, with its line and both
    values; the call), or (None, None)."""
    family = latent.tensor.split(":")[0].split(".gauss")[0]
    calls, label = _SEEDS.get(family), _GENERATORS.get(family, latent.tensor)
    if calls is None or len(latent.runs) < 2:
        return None, None
    runs = [group[0] for group in latent.runs[:2]]
    read = _seeding_calls(leg, latent)
    if read is None:
        return None, None
    a, b = ([c for c in made if c["call"].startswith(calls)] for made, _ in read)
    complete = [done for _, done in read]
    for x, y in zip(a, b):
        if x["value"] == "entropy" or y["value"] == "entropy":
            who = "every run" if x["value"] == y["value"] else f"run #{runs[1]}"
            call = x if x["value"] == "entropy" else y
            return (
                f"{who} re-seeded {label} from entropy at {call['where']} (`{call['call']}()`)",
                call,
            )
        if x["value"] != y["value"]:
            return f"`{x['call']}` got {x['value']} vs {y['value']} at {x['where']}", x
    if len(a) != len(b):
        longer, run = (a, runs[0]) if len(a) > len(b) else (b, runs[1])
        if not complete[1 if longer is a else 0]:
            return None, None  # the other run stopped early: it may not have got there yet
        call = longer[min(len(a), len(b))]
        return f"only run #{run} called `{call['call']}` (at {call['where']})", call
    if not a and all(complete):
        return f"the script never seeds {label}: it starts from entropy in every process", None
    return None, None


def _entropy_generators(leg: Leg, first: Divergence) -> list[dict[str, Any]]:
    """RC015 from the seeding calls themselves, where nothing else named the cause: a
    generator the script built from entropy (``np.random.default_rng()``, ``torch.seed()``)
    in the process that diverged, at or before the divergent step, in every run compared —
    a local generator (a collator's) whose state no trace records."""
    read = _seeding_calls(leg, first)
    if read is None or len(read) < 2:
        return []
    calls = [
        [
            c
            for c in made
            if c.get("value") == "entropy" and (c.get("step") is None or c["step"] <= first.step)
        ]
        for made, _ in read
    ]
    if not calls[0] or not calls[1]:
        return []
    call = calls[0][0]
    return [
        rules.RC015.fire(
            "entropy call", {"seeding": call}, call=call, step=first.step, phase=first.phase
        )
    ]


def _latent(legs: list[Leg]) -> list[Latent]:
    """Per leg and process: the first generator state that differs, and every generator
    that differs at that step."""
    found = []
    for leg in legs:
        for process in _process_runs(leg):
            latent = _leg_latent(leg, process, None)
            if latent is not None:
                traces, ids = _traces(leg.runs, process)
                differing = variability(traces, ids, latent.step)
                names = tuple(item["tensor"] for item in differing if item["phase"] == "rng")
                found.append(Latent(latent, names or (latent.tensor,)))
    return found


def _measure(launcher: Launcher, leg: Leg, divergence: Divergence, zoom: bool) -> Measurement:
    """Replay one run of each of the first two groups to the divergent step, keep the
    divergent tensor (numeric diff) and, with ``zoom``, every aten op of that step (the
    first divergent op, its module, source line and cause).

    A pair of replays that agree (intermittent nondeterminism) is tried again, up to
    :data:`ZOOM_ATTEMPTS` pairs; the report gives how many diverged.
    """

    chosen = [group[0] for group in divergence.runs[:2]]
    measured: dict[str, Any] = {"replayed_runs": chosen, "replay": "failed"}
    found: dict[str, Any] | None = None
    attempts = ZOOM_ATTEMPTS if zoom else 1
    traces = {r.run: r.trace for r in leg.runs}
    for attempt in range(attempts):
        # the first attempt resumes from checkpoints; if its pair shows no divergence the
        # next ones replay from step 0 (state no checkpoint holds may be what differs)
        paths = _replay(launcher, leg, chosen, divergence, zoom, attempt, traces, attempt == 0)
        if len(paths) < 2:
            measured["replay_error"] = _replay_error(launcher, chosen)
            break
        measured["replay_from"] = min(launcher.resumed.get(run, 0) for run in chosen)
        answer = launcher.analyse(
            leg,
            {
                "captures": [paths[run] for run in chosen],
                "key": capture_key(divergence.phase, divergence.tensor),
                "ops": [paths[run] + ".ops.json" for run in chosen] if zoom else None,
                "step": divergence.step,
                "phase": divergence.phase,
                # the zoom names the op that made this tensor where the first differing
                # op belongs to another
                "tensor": divergence.tensor,
                "shape": list(divergence.shape),
            },
        )
        measured_now = answer["found"]  # op-depth records keep no tensor
        diff, located = answer["diff"], answer["located"]
        measured["replays"] = attempt + 1
        if measured_now:
            measured.update(diff)
            originals = {group[0]: side for group, side in zip(divergence.runs, divergence.sides)}
            same = [
                originals[run] is not None and digest == originals[run].digest.hex()
                for run, digest in zip(chosen, answer["digests"])
            ]
            measured["replay"] = "reproduced" if all(same) else "differed"
            measured["sketches"] = {str(run): s for run, s in zip(chosen, answer["sketches"])}
        if located:
            found = located
        if diff.get("elements_differing") or located:
            measured["replays_diverged"] = 1
            break
        measured["replays_diverged"] = 0
    if measured["replay"] == "failed" and not measured.get("replay_error"):
        measured["replay_error"] = (
            f"the replays kept no {divergence.phase} · {divergence.tensor} at step "
            f"{divergence.step}"
        )
    return Measurement(diff=measured, zoom=found or {})


def _replay_error(launcher: Launcher, runs: list[int]) -> str:
    """Why the last capture of ``runs`` kept nothing: the first failed replay's error line."""
    errors = getattr(launcher, "replay_errors", {})
    run = next((run for run in runs if run in errors), None)
    if run is None:
        return "the replay kept no capture"
    return f"run #{run}: {errors[run]}"


def _measure_across(launcher: Launcher, a: Leg, b: Leg, where: dict[str, Any]) -> dict[str, Any]:
    """Replay run 0 of each leg to the step of ``where`` and diff the real tensors: by how
    much two legs differ, not only their sketches."""
    captures = []
    for leg in (a, b):
        run = leg.runs[0].run
        paths = launcher.capture(leg, [run], where["step"], [(where["phase"], where["tensor"])])
        if run not in paths:
            return {
                "step": where["step"],
                "tensor": where["tensor"],
                "replay": "failed",
                "replay_error": f"{leg.name}: {_replay_error(launcher, [run])}",
            }
        captures.append(paths[run])
    answer = launcher.analyse(
        a, {"captures": captures, "key": capture_key(where["phase"], where["tensor"])}
    )
    if not answer["found"]:
        return {"step": where["step"], "tensor": where["tensor"], "replay": "failed"}
    return {
        "step": where["step"],
        "phase": where["phase"],
        "tensor": where["tensor"],
        **answer["diff"],
    }


def _ladder_replay(
    launcher: Launcher, leg: Leg, divergence: Divergence, backend: str
) -> tuple[list[int], dict[int, str]]:
    """One run of each of the first two groups replayed to the divergent step through
    ``backend``: (the runs, run → capture path)."""
    chosen = [group[0] for group in divergence.runs[:2]]
    paths = launcher.capture(
        leg,
        chosen,
        divergence.step,
        [(divergence.phase, divergence.tensor)],
        process=divergence.process,
        backend=backend,
    )
    return chosen, paths


def _rung(launcher: Launcher, leg: Leg, divergence: Divergence) -> str:
    """Replay the first two groups' runs through ``aot_eager`` (AOT autograd's graphs run
    by eager kernels, no inductor codegen): ``diverges``, ``repeats``, or ``failed``."""
    chosen, paths = _ladder_replay(launcher, leg, divergence, "aot_eager")
    if len(paths) < 2:
        return "failed"
    key = capture_key(divergence.phase, divergence.tensor)
    answer = launcher.analyse(leg, {"captures": [paths[run] for run in chosen], "key": key})
    if not answer["found"]:
        return "failed"
    return "repeats" if answer["digests"][0] == answer["digests"][1] else "diverges"


def _graph_output(launcher: Launcher, leg: Leg, divergence: Divergence) -> dict | None:
    """Replay both runs through reprocheck's digesting backend (inductor's code, each
    graph call's outputs digested): the first compiled graph output that differs, with
    the line its FX node came from; None where the replays could not say."""
    from ..compiled import BACKEND, first_difference

    chosen, paths = _ladder_replay(launcher, leg, divergence, BACKEND)
    records = []
    for run in chosen:
        if run not in paths or not os.path.exists(paths[run] + ".graphs.json"):
            return None
        with open(paths[run] + ".graphs.json", encoding="utf-8") as handle:
            records.append(json.load(handle))
    return first_difference(records[0], records[1])


def _ran_compiled(leg: Leg) -> bool:
    """Whether run 0 of the leg ran a model torch.compile'd (its trace's ``compiled``)."""
    run = leg.runs[0] if leg.runs else None
    if run is None:
        return False
    for path in run.processes.values():
        try:
            with Trace(path, own=True) as trace:
                if trace.run_meta.compiled is True:
                    return True
        except TraceError:
            continue
    return False


def _rung_text(ladder: dict[str, str]) -> str:
    """Where down the ladder (inductor → aot_eager → eager) the divergence disappears."""
    if ladder["aot_eager"] == "repeats":
        return (
            "compile-caused: it repeats through aot_eager (AOT autograd's graphs on eager "
            "kernels), so inductor's generated code makes it; the op capture below runs "
            "the regions eagerly"
        )
    if ladder["eager"] == "repeats":
        return (
            "it persists through aot_eager and disappears in eager execution (the op "
            "capture): AOT autograd's graphs make it"
        )
    if ladder["aot_eager"] == "failed":
        return "eager (op capture): the aot_eager replay failed; this op and line are eager's"
    return (
        "it persists at every rung down to eager: this op and line (from the op capture, "
        "which runs the compiled regions eagerly) are where it starts"
    )


def _replay(
    launcher: Launcher,
    leg: Leg,
    chosen: list[int],
    divergence: Divergence,
    zoom: bool,
    attempt: int,
    originals: dict[int, str],
    resume: bool,
) -> dict[int, str]:
    """Capture the divergent step, from checkpoints where they prove faithful: a resumed
    replay must record steps c+1…k−1, and step k up to the divergent record, exactly as
    its original run did; else from step 0."""
    step, wanted = divergence.step, [(divergence.phase, divergence.tensor)]
    process = divergence.process
    paths = launcher.capture(leg, chosen, step, wanted, zoom, attempt, resume, process)
    resumed = [run for run in chosen if launcher.resumed.get(run)]
    if not resumed:
        return paths

    def proven(run: int) -> bool:
        # the capture exists, so the replay reached step k; a step it lacks is a mismatch
        try:
            differs = first_mismatch(
                originals[run],
                launcher.replay_trace(run),
                step,
                launcher.resumed[run] + 1,
                own=True,
            )
        except TraceError:
            return False
        return differs is None or differs >= (step, divergence.seq)

    if len(paths) == len(chosen) and all(proven(run) for run in resumed):
        return paths
    return launcher.capture(leg, chosen, step, wanted, zoom, attempt, False, process)


def variability(traces: list[str], run_ids: list[int], step: int) -> list[dict[str, Any]]:
    """At a step: each tensor with more than one distinct digest across the runs, grouped."""
    from ..trace import Trace

    records: dict[int, dict[int, Any]] = {}
    for run, path in zip(run_ids, traces):
        with Trace(path, own=True) as trace:
            for record in trace.records(step):
                records.setdefault(record.seq, {})[run] = record
    out = []
    for seq in sorted(records):
        by_run = records[seq]
        groups: dict[bytes, list[int]] = {}
        for run, record in by_run.items():
            groups.setdefault(record.digest, []).append(run)
        if len(groups) > 1:
            first = next(iter(by_run.values()))
            out.append(
                {
                    "phase": first.phase,
                    "tensor": first.name,
                    "distinct": len(groups),
                    "runs": list(groups.values()),
                }
            )
    return out


class _Clock:
    """Each stage's seconds (the report's ``timings``), and whether Ctrl-C stopped one."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.interrupted = False

    @contextlib.contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Time a stage; a Ctrl-C in it ends it (the stages after it are skipped)."""
        begun = time.monotonic()
        try:
            yield
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.timings[key] = time.monotonic() - begun


def run_audit(
    config: Config,
    options: AuditOptions,
    progress: Callable[[RunResult, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the audit's stages and return the report (built by :mod:`.values`): each stage
    reads the values of the ones before it and returns its own, and none is changed after."""
    from .values import build_report

    clock = _Clock()
    folder = make_audit_dir(options.out, config.name)
    planned = plan_legs(config)
    launcher = Launcher(
        config,
        folder,
        jobs=_jobs(config, options),
        timeout=options.timeout,
        # sketches only where used: across legs
        with_sketch=options.sketch or sum(leg.status != "skipped" for leg in planned) > 1,
        fail_fast=options.fail_fast,
        depth=options.depth,
        progress=progress,
        target=options.target,
        checkpoints=options.measure,  # a replay then starts near the divergent step
        fork_runs=options.fork_runs,
        any_threads=options.any_threads,
    )
    legs, clock.interrupted = launcher.run(planned)
    clock.timings["runs_s"] = time.monotonic() - clock.started
    active = [leg for leg in legs if leg.status != "skipped"]

    # the first divergence, and what the traces say of it
    divergences = [] if clock.interrupted else [d for d in map(_leg_divergence, active) if d]
    first = min(divergences, key=lambda d: (d.step, d.seq), default=None)
    leg = next((leg for leg in active if first and leg.name == first.leg), None)
    evidence = _evidence(leg, first) if leg is not None and first is not None else Evidence()
    latent = _latent(active) if first is None and not clock.interrupted else []
    untrained = None
    if not clock.interrupted and active and not any(_trained(each) for each in active):
        untrained = _untrained_reason(config, options, active)

    measurement = Measurement()
    # a script's replay reruns it whole; the capture is made in the process that diverged
    if leg is not None and first is not None and first.kind == "value" and options.measure:
        with clock.stage("measure_s"):
            measurement = _measure_stage(launcher, leg, first, options)
    checkpoint.remove_all(str(folder))  # they serve the replays above only

    across = _across_stage(launcher, config, active, options, clock)
    golden = _golden_stage(config, options, active, clock)

    findings: list[dict[str, Any]] = []
    attribution: list[dict[str, Any]] = []
    if leg is not None and first is not None and not clock.interrupted:
        findings, attribution, clock.interrupted = _findings(
            config, options, leg, first, evidence, measurement, folder, clock.timings
        )
        if not any(f.get("severity") == "error" for f in findings):
            findings = [*_entropy_generators(leg, first), *findings]
    replicas = None
    if not clock.interrupted:
        with clock.stage("replicas_s"):
            replicas = check_legs(active)
        if replicas is None:
            del clock.timings["replicas_s"]
    if replicas is not None and replicas.divergence is not None:
        findings = [*findings, replica_finding(replicas.divergence)]
    findings = [
        *findings,
        *map(_latent_finding, latent),
        *_observed_findings(active),
        *_shared_files(active),
    ]
    if golden is not None and golden.packages_differ:
        findings.append(_drift_finding(golden.packages_differ))

    # every run of every leg completed and agreed (with the golden, between replicas):
    # a reproducible verdict, which the self-checks and the as-is pair test further
    agreed = (
        first is None
        and not clock.interrupted
        and untrained is None
        and bool(active)
        and not (golden is not None and golden.matches is False)
        and not (replicas is not None and replicas.divergence is not None)
        and all(run.status == "complete" for leg in active for run in leg.runs)
    )
    canary, observer, as_is = (
        _checks_stage(launcher, config, options, active[0], folder, clock)
        if agreed
        else (None, None, None)
    )
    if as_is is not None and as_is.get("finding"):
        findings.append(as_is["finding"])
        as_is = {key: value for key, value in as_is.items() if key != "finding"}
    clock.timings["total_s"] = time.monotonic() - clock.started
    return build_report(
        config,
        legs,
        first,
        divergences,
        across,
        evidence=evidence,
        measurement=measurement,
        folder=folder,
        timings=clock.timings,
        interrupted=clock.interrupted,
        findings=findings,
        attribution=attribution,
        untrained=untrained,
        golden=golden,
        command=options.target.shown() if options.target.is_script else None,
        replicas=replicas,
        as_is=as_is,
        canary=canary,
        observer=observer,
        confidence=options.confidence,
        max_rate=options.max_rate,
    )


def _checks_stage(
    launcher: Launcher,
    config: Config,
    options: AuditOptions,
    leg: Leg,
    folder: Path,
    clock: _Clock,
) -> tuple[dict | None, dict | None, dict | None]:
    """After a reproducible verdict: the canary and observer runs, then (a script under a
    preset, both self-checks passed) the as-is pair. (canary, observer, as-is)."""
    canary = observer = as_is = None
    if options.canary or options.observer:
        with clock.stage("checks_s"):
            canary, observer = _self_checks(launcher, config, options, leg)
    if (
        not clock.interrupted  # (a Ctrl-C during the self-checks)
        and options.as_is
        and (canary is None or canary["caught"])
        and (observer is None or observer["agrees"])
        and options.target.is_script
        and not isinstance(options.target, Function)
        and config.determinism.preset != "none"
    ):
        with clock.stage("as_is_s"):
            as_is = _as_is(config, options, leg, folder)
    return canary, observer, as_is


def _measure_stage(
    launcher: Launcher, leg: Leg, first: Divergence, options: AuditOptions
) -> Measurement:
    """The divergent step replayed: the numeric diff on the real tensors and the zoom;
    for a compiled leg, the ladder's rungs too."""
    measurement = _measure(launcher, leg, first, options.zoom)
    if leg.compile and options.zoom:
        # a TorchDispatchMode runs compiled regions eagerly: never present its op
        # as the compiled model's, and a divergence it cannot repeat is the
        # compiled code's; the ladder's middle rung tells AOT autograd's graphs
        # from inductor's generated code
        ladder = {"inductor": "diverges", "aot_eager": _rung(launcher, leg, first)}
        ladder["eager"] = "diverges" if measurement.zoom.get("op") else "repeats"
        zoom = {**measurement.zoom, "ladder": ladder, "rung": _rung_text(ladder)}
        graph = _graph_output(launcher, leg, first)
        if graph is not None:  # what the compiled code itself computed, first apart
            zoom["compiled_output"] = graph
        return replace(measurement, zoom=zoom)
    if options.zoom and measurement.zoom.get("op") and _ran_compiled(leg):
        # the script compiles its model itself (no --compile leg): the op capture
        # ran the compiled regions eagerly, and the report says on which rung
        rung = (
            "eager (op capture): the model ran torch.compile'd, and the op capture "
            "runs its compiled regions eagerly; `--compile on` replays down the "
            "ladder from inductor"
        )
        return replace(measurement, zoom={**measurement.zoom, "rung": rung})
    return measurement


def _across_stage(
    launcher: Launcher, config: Config, active: list[Leg], options: AuditOptions, clock: _Clock
) -> list[LegComparison]:
    """Each leg's reference run against the first leg's, under the tolerance; where they
    part, the two replayed and measured."""
    across: list[LegComparison] = []
    if clock.interrupted or len(active) < 2:
        return across
    reference = [_reference_run(leg) for leg in active]
    tolerance = Tolerance(rtol=config.tolerance.rtol, atol=config.tolerance.atol)
    for index in range(1, len(active)):
        a, b = reference[0], reference[index]
        if a is None or b is None:
            continue
        names = (active[0].name, active[index].name)
        compared = compare_sketches(a.trace, b.trace, tolerance, names, own=True)
        where = compared.first_outside or compared.first_differing
        if where is not None and options.measure and b.status == "complete":
            try:
                measured = _measure_across(launcher, active[0], active[index], where)
                compared = replace(compared, measured=measured)
            except KeyboardInterrupt:
                clock.interrupted = True
                across.append(compared)
                break
        across.append(compared)
    return across


def _golden_stage(
    config: Config, options: AuditOptions, active: list[Leg], clock: _Clock
) -> GoldenCheck | None:
    """``check``: run 0 of the first leg against the golden trace."""
    reference = _golden_reference(active)
    if not options.golden or clock.interrupted or reference is None:
        return None
    from ..golden import check_against

    return check_against(options.golden, reference, config, options.any_config)


def _self_checks(
    launcher: Launcher, config: Config, options: AuditOptions, leg: Leg
) -> tuple[dict | None, dict | None]:
    """The canary and the observer runs, side by side (each one forked run of the leg):
    (the report's ``canary``, its ``observer``)."""
    run0 = leg.runs[0]
    step = 1 if run0.steps >= 2 else 0
    # run 0's processes that trained: name → (trace, steps committed)
    trained = {
        name: (path, steps)
        for name, path in run0.processes.items()
        if (steps := committed_steps(path))
    }
    runs: list[tuple[str, dict[str, Any]]] = []
    if options.canary:
        extra: dict[str, Any] = {"canary": Canary(step)}
        if set(trained) <= {"main"}:  # one process: the canary run stops after step c + 1
            if options.target.is_script:
                extra["target"] = options.target.with_steps(step + 1)
            else:
                extra["steps"] = step + 1
        runs.append((".canary", extra))
    if options.observer:
        runs.append((".observer", {"observer": True}))
    results = dict(zip([suffix for suffix, _ in runs], launcher.extra_runs(leg, runs, step + 1)))
    canary = _canary(results[".canary"], trained, step) if ".canary" in results else None
    observer = _observer(results[".observer"], trained) if ".observer" in results else None
    return canary, observer


def _observer(result: RunResult, trained: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Run 0's weights and optimizer state at every step against the observer run's,
    which recorded nothing else: the first record that differs, process by process."""
    section: dict[str, Any] = {"trace": result.trace, "agrees": True, "first_difference": None}
    if result.status != "complete":
        section.update(agrees=False, why=f"the observer run {result.status}: {result.error}")
        return section
    for name, (path, _) in sorted(trained.items()):
        other = result.processes.get(name)
        if other is None:
            section.update(agrees=False, why=f"process {name} wrote no trace in the observer run")
            return section
        found = _state_difference(path, other)
        if found is not None:
            where = "" if name == "main" else f" of process {name}"
            section.update(
                agrees=False,
                first_difference={**found, "process": name},
                why=(
                    f"recording changed training: step {found['step']} · {found['phase']} · "
                    f"{found['tensor']}{where} differs from a run that recorded only weights "
                    "and optimizer state — a defect in reprocheck"
                ),
            )
            return section
    return section


def _state_difference(recorded: str, observed: str) -> dict[str, Any] | None:
    """The first (step, phase, tensor) whose weights or optimizer digest differs between a
    recorded run and the observer run, over the steps both committed."""
    with Trace(recorded, own=True) as a, Trace(observed, own=True) as b:
        for step in sorted(set(a.steps) & set(b.steps)):
            theirs = {
                (r.phase, r.name): r.digest
                for r in b.records(step)
                if r.phase in ("weights", "optimizer")
            }
            for record in a.records(step):
                key = (record.phase, record.name)
                if key in theirs and theirs[key] != record.digest:
                    return {"step": step, "phase": record.phase, "tensor": record.name}
    return None


def _canary(result: RunResult, trained: dict[str, tuple[str, int]], step: int) -> dict[str, Any]:
    """Each process of the canary run flipped the lowest bit of its first trained tensor
    right before step ``c``'s weights were recorded (c = 1, or 0 for a run of one step).
    Compared with run 0, each must differ first at exactly step c · weights · that
    tensor; ``reached``: the phases of step c + 1 it changed."""
    trained = {name: entry for name, entry in trained.items() if entry[1] > step}
    section: dict[str, Any] = {"step": step, "trace": result.trace, "processes": []}
    if result.status != "complete":
        section.update(caught=False, why=f"the canary run {result.status}: {result.error}")
        return section
    processes = result.processes
    for name, (path, steps) in sorted(trained.items()):
        entry: dict[str, Any] = {"process": name, "tensor": None, "found": None, "reached": []}
        section["processes"].append(entry)
        other = processes.get(name)
        if other is None:
            entry["why"] = f"process {name} wrote no trace in the canary run"
            continue
        try:
            with Trace(other, own=True) as trace:
                planted = trace.run_meta.canary
        except TraceError as exc:
            entry["why"] = str(exc)
            continue
        if not isinstance(planted, dict) or not planted.get("flipped"):
            entry["why"] = f"process {name} flipped no bit at step {step}" + (
                f" ({planted['why']})" if isinstance(planted, dict) and "why" in planted else ""
            )
            continue
        entry["tensor"] = planted["tensor"]
        found = first_divergence([path, other], partial=True, own=True)
        if found is not None:
            entry["found"] = {"step": found.step, "phase": found.phase, "tensor": found.tensor}
        if steps > step + 1 and committed_steps(other) > step + 1:
            differing = variability([path, other], [0, 1], step + 1)
            entry["reached"] = sorted(
                {d["phase"] for d in differing if d["phase"] in ("outputs", "loss", "grads")},
                key=("outputs", "loss", "grads").index,
            )
        expected = {"step": step, "phase": "weights", "tensor": planted["tensor"]}
        if entry["found"] != expected:
            seen = entry["found"]
            where = "" if name == "main" else f" of process {name}"
            seen_text = (
                "not seen at all"
                if seen is None
                else f"seen at step {seen['step']} · {seen['phase']} · {seen['tensor']}"
            )
            entry["why"] = f"a flipped bit in {planted['tensor']}{where} after step {step} was "
            entry["why"] += seen_text
    missed = [entry["why"] for entry in section["processes"] if "why" in entry]
    if not section["processes"]:
        missed.append("no process of run 0 trained past step " + str(step))
    section["caught"] = not missed
    if missed:
        section["why"] = "; ".join(missed)
    return section


def _as_is(config: Config, options: AuditOptions, leg: Leg, folder: Path) -> dict[str, Any]:
    """Two runs of the script as its user runs it: no preset (its own seeding, the user's
    environment; a random ``PYTHONHASHSEED`` where the shell sets none: those runs start
    fresh). Where they differ, what made them: a generator drawn before the script seeded
    it (read from the runs' seeding calls), or — proven by a pair with one fixed hash
    seed that agrees — the hash seed."""
    from ..config import PRESETS, DeterminismConfig

    variant = replace(
        config,
        repeats=2,
        determinism=DeterminismConfig(preset="none", **PRESETS["none"]),
        devices=(leg.device,),
        threads=(leg.threads,),
        compile=(leg.compile,),
        environments=(leg.env,),
    )
    auditor = Auditor(options.target)
    report = auditor.audit(variant, folder / "as-is")
    hashseed = os.environ.get("PYTHONHASHSEED")
    section: dict[str, Any] = {
        "verdict": report["verdict"],
        "pythonhashseed": hashseed if hashseed is not None else "random",
        "first_divergence": None,
        "cause": None,
    }
    first = report.get("first_divergence")
    if report["verdict"] != "diverged" or not first:
        if report["verdict"] not in ("reproducible", "diverged"):
            section["reason"] = report.get("reason")
        return section
    where = {key: first.get(key) for key in ("step", "phase", "tensor", "process")}
    section["first_divergence"] = where
    at = f"step {where['step']} · {where['phase']} · {where['tensor']}"
    runs = [run for each in report["legs"] for run in each["runs"]]
    # a draw before the script's seeding explains a difference from its first steps on
    early = _drawn_before_seeding(runs) if (where["step"] or 0) <= 1 else None
    facts: dict[str, Any] = {"at": at}
    if early is not None:
        call, drawn = early
        section["cause"] = {"kind": "seeded-late", "call": call, "drawn_before": drawn}
        way = "seeded late"
        facts.update(call=call, drawn=drawn)
    elif hashseed is None:
        fixed = replace(
            variant,
            determinism=DeterminismConfig(
                preset="none", **{**PRESETS["none"], "pythonhashseed": 0}
            ),
        )
        check = auditor.audit(fixed, folder / "as-is-hashseed")
        if check["verdict"] != "reproducible":
            section["cause"] = {"kind": "unknown"}
            way = "not the hash seed"
        else:
            section["cause"] = {"kind": "hash-seed"}
            way = "hash seed"
    else:
        section["cause"] = {"kind": "unknown"}
        way = "unknown"
    section["finding"] = rules.RC030.fire(way, section["cause"], **facts)
    return section


def _drawn_before_seeding(runs: list[dict[str, Any]]) -> tuple[dict, dict] | None:
    """The first seeding call of torch's generator that found it already drawn from, in
    the as-is runs' traces (the script's own process first)."""
    for run in runs:
        paths = [run["trace"], *(p["trace"] for p in run.get("processes") or [] if p.get("trace"))]
        for path in paths:
            try:
                with Trace(path, own=True) as trace:
                    calls = trace.run_meta.seeding or []
            except TraceError:
                continue
            for call in calls:
                if isinstance(call, dict) and call.get("drawn_before"):
                    return call, call["drawn_before"]
    return None


def _jobs(config: Config, options: AuditOptions) -> int | None:
    """Runs at a time. A ``torchrun`` job's repeats run side by side only where each can
    find its own port (``--standalone``, an endpoint on port 0); a fixed rendezvous port
    makes them run one after another, and so does a GPU leg (each job's ranks take every
    device it names)."""
    job = options.target
    if not isinstance(job, TorchrunJob):
        return options.jobs
    if job.fixed_port or any(d != "cpu" for d in config.devices):
        return 1
    return options.jobs


def _golden_reference(legs: list[Leg]) -> str | None:
    """The trace a golden check compares: run 0 of the first leg, if every run ended."""
    runs = [run for leg in legs for run in leg.runs]
    if not runs or any(run.status not in ("complete", "stopped") for run in runs):
        return None
    first = legs[0].runs[0]
    return first.trace if first.steps else None


def _untrained_reason(config: Config, options: AuditOptions, legs: list[Leg]) -> str:
    """Why an audit that saw no training step cannot pass, and what to do."""
    processes = sorted({name for leg in legs for run in leg.runs for name in run.processes})
    where = f" in {len(processes)} processes" if len(processes) > 1 else ""
    if options.target.is_script:
        return (
            f"no training step recorded{where}: reprocheck looked for optimizer.step() calls "
            "and for updates of the parameters backward() gave gradients to; the script "
            "ran without either (does it train in a process that is not Python, or only "
            "evaluate?). See docs/exec.md, 'How a step is found'"
        )
    return (
        f"no training step recorded{where}: the data factory yielded no batch, or the "
        f"step function never stepped the optimizer (config {config.path})"
    )


def _observed_findings(legs: list[Leg]) -> list[dict[str, Any]]:
    """What a run's processes noted for a rule while they ran, read from the first run of
    each leg, each of its traces opened once: an evaluation forward with dropout or batch
    norm in training mode (RC019, ``meta.observations``), a compiled model's dropout drawing
    from inductor's generator (RC028), and the script's torch.compile calls (RC026, RC027,
    RC029: see :func:`_compile_findings`); once per model and line. A process notes an
    observation by its rule's name (it imports no catalog)."""
    found: dict[tuple[str, str | None], dict[str, Any]] = {}
    for leg in legs:
        for run in leg.runs[:1]:
            for process, path in run.processes.items():
                try:
                    with Trace(path, own=True) as trace:
                        meta = trace.run_meta
                except TraceError:
                    continue
                for seen in meta.observations or []:
                    key = (seen["model"], seen["where"])
                    rule = rules.BY_NAME.get(seen.get("rule"))
                    if key in found or rule is None or "observed" not in rule.ways:
                        continue
                    facts = {k: v for k, v in seen.items() if k != "rule"}
                    evidence = {"code": rule.code, **facts, "process": process}
                    found[key] = rule.fire("observed", evidence, **facts, process=process)
                _compile_findings(meta, path, found)
    return list(found.values())


def _shared_files(legs: list[Leg]) -> list[dict[str, Any]]:
    """RC031: files that two runs of a leg both opened for writing at one path (each
    process's ``meta.written``): the runs shared a working directory."""

    def written(run: RunResult) -> set[str]:
        paths: set[str] = set()
        for path in run.processes.values():
            try:
                with Trace(path, own=True) as trace:
                    paths.update(p for p in trace.run_meta.written or [] if isinstance(p, str))
            except TraceError:
                continue
        return paths

    for leg in legs:
        runs = [run for run in leg.runs if run.status != "pending"]
        if len(runs) < 2:
            continue
        sets = [written(run) for run in runs]
        shared = sorted(set.intersection(*sets) if all(sets) else set())
        if not shared:
            continue
        evidence = {"paths": shared[:50], "count": len(shared)}
        return [rules.RC031.fire("shared files", evidence, paths=shared)]
    return []


def _compile_findings(meta: dict[str, Any], path: str, found: dict[tuple, dict]) -> None:
    """Into ``found``: a trace's torch.compile calls whose mode or options autotune
    (RC026) or record CUDA graphs (RC027), from ``meta.compile_options``, once per line;
    graphs dynamo made after the first step (RC029, ``meta.dynamo_graphs``)."""
    graphs = meta.dynamo_graphs or {}
    first, end = graphs.get("step1"), graphs.get("end")
    recompiled = rules.RC029.fires("recompiles", first=first, end=end)
    if recompiled and (rules.RC029.code, path) not in found:
        found[(rules.RC029.code, path)] = rules.RC029.fire(
            "recompiles", graphs, first=first, end=end
        )
    for call in meta.compile_options or []:
        asked = [call.get("mode") or ""]
        asked += [f"{k}={v}" for k, v in (call.get("options") or {}).items()]
        text = " ".join(asked).strip()
        for rule in rules.RULES:
            key = (rule.code, call["where"])
            if rule.fires("compile call", text=text) and key not in found:
                found[key] = rule.fire("compile call", call, where=call["where"], text=text)


def _drift_finding(packages: dict[str, list[str]]) -> dict[str, Any]:
    return rules.RC021.fire("drift", {"packages": packages}, packages=packages)


def _latent_finding(found: Latent) -> dict[str, Any]:
    latent, names = found.divergence, list(found.generators)
    return rules.RC018.fire(
        "latent",
        {**_generator(latent), "generators": names},
        generators=names,
        runs=latent.runs,
        step=latent.step,
        process=latent.process,
    )


def _findings(
    config: Config,
    options: AuditOptions,
    leg: Leg,
    first: Divergence,
    evidence: Evidence,
    measurement: Measurement,
    folder: Path,
    timings: dict[str, float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """The cause and fix: by attribution (rerunning with each control), else from the zoom
    or the generator that differed."""
    zoom = measurement.zoom
    from ..doctor.attribute import attribute

    if options.attribute:
        started = time.monotonic()
        try:
            found, tried = attribute(
                Auditor(options.target, any_threads=True),
                config,
                leg.device,
                leg.threads,
                first.step,
                folder / "attribution",
                zoom,
                jobs=_jobs(config, options),
                leg_compile=leg.compile,
                leg_env=leg.env,
            )
        except KeyboardInterrupt:
            return [], [], True
        timings["attribution_s"] = time.monotonic() - started
        return found, tried, False
    g = evidence.generator
    if rules.RC015.fires("generator", generator=g, cause=zoom.get("cause")):
        found = rules.RC015.fire(
            "generator",
            {**g, "seeding": evidence.seeding},
            generator=g,
            seeding=evidence.seeding,
            where=zoom.get("source"),
            step=first.step,
            call=evidence.seeding_call,  # the fix names the script's own call and line
        )
        return [found], [], False
    return rules.for_cause(zoom), [], False


def _reference_run(leg: Leg) -> RunResult | None:
    """The leg's run to compare with other legs: the first that completed."""
    for run in leg.runs:
        if run.status == "complete":
            try:
                with Trace(run.trace, own=True):
                    return run
            except TraceError:
                continue
    return None
