"""One audit, start to finish: plan the legs, run them, find the first divergence, measure
it on the real tensors, compare the legs, and assemble the report.

This is what ``reprocheck run`` calls; the CLI only parses, renders and exits. The stages
themselves live beside it: :mod:`.divergence` (where the runs part, and what their traces
say), :mod:`.replay` (the divergent step replayed, measured and zoomed), :mod:`.findings`
(the rules and attribution), :mod:`.checks` (canary, observer, as-is pair).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import checkpoint
from ..config import Config
from ..contract import (
    AS_IS_ENV,
    CANARY_ENV,
    OBSERVER_ENV,
    Recipe,
    Recording,
    Target,
    TorchrunJob,
)
from ..options import DEFAULT_OUT, DEPTHS
from ..replicas import check_legs
from ..replicas import finding as replica_finding
from .checks import (
    checks_stage,
)
from .divergence import (
    entropy_generators,
    evidence_at,
    latent_generators,
    leg_divergence,
    leg_trained,
)
from .findings import (
    audit_findings,
    drift_finding,
    latent_finding,
    observed_findings,
    shared_files,
)
from .launch import Launcher, Leg, RunResult, plan_legs
from .replay import (
    across_stage,
    measure_stage,
)
from .sparse import localize_stage
from .stages import Evidence, Measurement

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
    # `--record sparse`, `--every M`: the verdict's runs record one digest per phase, or
    # every M-th step; a divergence is then found exactly by replays (parent/sparse.py)
    recording: Recording = field(default_factory=Recording)


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
        recording=options.recording,
    )
    legs, clock.interrupted = launcher.run(planned)
    clock.timings["runs_s"] = time.monotonic() - clock.started
    active = [leg for leg in legs if leg.status != "skipped"]

    # the first divergence, and what the traces say of it
    divergences = [] if clock.interrupted else [d for d in map(leg_divergence, active) if d]
    first = min(divergences, key=lambda d: (d.step, d.seq), default=None)
    leg = next((leg for leg in active if first and leg.name == first.leg), None)
    localized = None
    if leg is not None and first is not None and not options.recording.plain:
        # sparse or sampled records: the exact step, then the tensor, from replays of two
        # runs that disagree; the stages after read those replays' full traces
        with clock.stage("localize_s"):
            localized = localize_stage(launcher, leg, first, options.recording)
        if localized.leg is not None and localized.divergence is not None:
            leg, first = localized.leg, localized.divergence
    evidence = evidence_at(leg, first) if leg is not None and first is not None else Evidence()
    latent = latent_generators(active) if first is None and not clock.interrupted else []
    untrained = None
    if not clock.interrupted and active and not any(leg_trained(each) for each in active):
        untrained = _untrained_reason(config, options, active)

    measurement = Measurement()
    # a script's replay reruns it whole; the capture is made in the process that diverged
    if leg is not None and first is not None and first.kind == "value" and options.measure:
        with clock.stage("measure_s"):
            measurement = measure_stage(launcher, leg, first, options)
    checkpoint.remove_all(str(folder))  # they serve the replays above only

    across = across_stage(launcher, config, active, options, clock)
    golden = _golden_stage(config, options, active, clock)

    findings: list[dict[str, Any]] = []
    attribution: list[dict[str, Any]] = []
    if leg is not None and first is not None and not clock.interrupted:
        findings, attribution, clock.interrupted = audit_findings(
            config, options, leg, first, evidence, measurement, folder, clock.timings
        )
        if not any(f.get("severity") == "error" for f in findings):
            findings = [*entropy_generators(leg, first), *findings]
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
        *map(latent_finding, latent),
        *observed_findings(active),
        *shared_files(active),
    ]
    if golden is not None and golden.packages_differ:
        findings.append(drift_finding(golden.packages_differ))

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
        checks_stage(launcher, config, options, active[0], folder, clock)
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
        recording=options.recording,
        localized=localized,
    )


def _golden_stage(
    config: Config, options: AuditOptions, active: list[Leg], clock: _Clock
) -> GoldenCheck | None:
    """``check``: run 0 of the first leg against the golden trace."""
    reference = _golden_reference(active)
    if not options.golden or clock.interrupted or reference is None:
        return None
    from ..golden import check_against

    return check_against(options.golden, reference, config, options.any_config)


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
