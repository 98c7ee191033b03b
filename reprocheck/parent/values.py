"""The report values stage: the audit's stage results → the ``reprocheck.report/1`` dict.

The last stage in the parent (runs → first divergence → measurement → zoom → attribution
→ **report values** → renderers). It reads what the runs left in their traces (record
counts, phases, processes, the environment) and the values of the stages before it, and
decides the verdict; renderers (:mod:`reprocheck.report`) only render the dict it returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..compare import (
    Divergence,
    LegComparison,
    Tolerance,
    compare_sketches,
    comparison_dict,
    divergence_dict,
)
from ..config import PHASES, TRACE_PHASES, Config
from ..contract import ProcessName, Recording, RunMeta
from ..golden import GoldenCheck
from ..replicas import ReplicaCheck
from ..trace import LATENT_PHASES, Trace, TraceError
from ..verdict import FAILED_RUN, decide
from .launch import Leg, RunResult
from .sparse import Localized
from .stages import Evidence, Measurement

SCHEMA = "reprocheck.report/1"


@dataclass(frozen=True)
class _TraceFacts:
    """What the report says of one trace, read once: records, phases, steps, status, and
    what the page's plot draws (the loss per step, whether sketches were taken)."""

    records: int = 0
    phases: frozenset[str] = frozenset()
    last_step: int | None = None
    status: str = "unreadable"
    meta: RunMeta = field(default_factory=RunMeta)
    error: str | None = None  # why it could not be read
    losses: list[list[Any]] = field(default_factory=list)  # [step, loss] pairs
    sketched: bool = False
    # run 0's traces (the report's coverage): each observable phase's tensors per
    # training step read, and how many steps were read
    counts: dict[str, list[int]] | None = None
    sampled: int = 0


def _read_traces(legs: Sequence[Leg]) -> dict[str, _TraceFacts]:
    """Every process trace of every run that ran, each opened once (run 0's also read for
    the coverage, :func:`_phase_counts`)."""
    facts = {}
    for leg in legs:
        for index, run in enumerate(leg.runs):
            for path in run.processes.values():
                try:
                    with Trace(path, own=True) as trace:
                        counts, sampled = (
                            _phase_counts(trace) if index == 0 and trace.last_step else (None, 0)
                        )
                        facts[path] = _TraceFacts(
                            trace.record_count(),
                            frozenset(trace.phases()),
                            trace.last_step,
                            trace.status,
                            trace.run_meta,
                            losses=[[step, loss] for step, loss in sorted(trace.losses().items())],
                            sketched=trace.has_sketches,
                            counts=counts,
                            sampled=sampled,
                        )
                except TraceError as exc:
                    facts[path] = _TraceFacts(error=str(exc))
    return facts


def _phase_counts(trace: Trace) -> tuple[dict[str, list[int]], int]:
    """Each observable phase's tensors at the trace's training steps (at most
    :data:`_SAMPLED_STEPS` of them, evenly spread, the last included), and how many."""
    steps = list(range(1, (trace.last_step or 0) + 1))
    if len(steps) > _SAMPLED_STEPS:
        stride = len(steps) / _SAMPLED_STEPS
        steps = sorted({steps[int(i * stride)] for i in range(_SAMPLED_STEPS)} | {steps[-1]})
    counts: dict[str, list[int]] = {phase: [] for phase in OBSERVABLE}
    for step in steps:
        seen = Counter(r.phase for r in trace.records(step))
        for phase in OBSERVABLE:
            counts[phase].append(seen.get(phase, 0))
    return counts, len(steps)


def _environment(legs: Sequence[Leg], facts: dict[str, _TraceFacts]) -> dict[str, Any]:
    for leg in legs:
        for run in leg.runs:
            read = facts.get(run.trace)
            if read is not None and read.error is None:
                env = dict(read.meta.environment or {})
                env["hasher"] = read.meta.hasher
                return env
    return {}


def _versions(leg: Leg, facts: dict[str, _TraceFacts]) -> dict[str, Any] | None:
    """The interpreter, torch and NumPy a leg's first run used (another venv: others)."""
    for run in leg.runs:
        read = facts.get(run.trace)
        env = (read.meta.environment or {}) if read is not None else {}
        if env:
            return {key: env.get(key) for key in ("python", "torch", "numpy")}
    return None


def _compile_leg(leg: Leg, facts: dict[str, _TraceFacts]) -> dict[str, Any] | None:
    """A compiled leg: inductor's settings as its first run had them, and its cache."""
    if not leg.compile:
        return None
    for run in leg.runs:
        for path in run.processes.values():
            read = facts.get(path)
            inductor = read.meta.compile_settings if read is not None else None
            if inductor:  # inductor's own configuration: its keys are torch's
                cache = inductor.get("cache_dir")
                return {
                    "settings": {k: v for k, v in inductor.items() if k != "cache_dir"},
                    "cache_dir": cache,
                    "cache_warm": read.meta.compile_cache_warm,  # type: ignore[union-attr]
                    "note": "inductor's on-disk cache is shared by the leg's runs: a graph "
                    "one run compiled, the next loads (the same generated code either way)",
                }
    return {"settings": None, "cache_dir": None, "cache_warm": None, "note": None}


def _leg_records(leg: Leg, facts: dict[str, _TraceFacts]) -> tuple[int, list[str]]:
    """The records the leg's runs committed (every process), and the phases among them."""
    read = [facts[path] for run in leg.runs for path in run.processes.values()]
    phases = set().union(*(f.phases for f in read))
    return sum(f.records for f in read), [p for p in TRACE_PHASES if p in phases]


def _process(name: str, path: str, planned: int, read: _TraceFacts) -> dict[str, Any]:
    """One process of a run: its role, rank or creation index, trace and steps."""
    process = ProcessName(name)
    role, number = process.role, process.number
    out: dict[str, Any] = {"name": name, "role": role, "trace": path, "steps": None}
    out["rank" if role in ("rank", "spawn") else "index"] = number
    out["steps"], out["status"] = read.last_step, read.status
    if read.error is not None:
        out["error"] = read.error
    out["note"] = _short(out["steps"], planned) if out["steps"] is not None else None
    return out


def _processes(run: RunResult, planned: int, facts: dict[str, _TraceFacts]) -> dict[str, Any]:
    """A run's processes, and its note: a run that ended before the requested steps (in
    the process that trained furthest) says so."""
    processes = [_process(name, path, planned, facts[path]) for name, path in run.processes.items()]
    trained = [p["steps"] for p in processes if p["steps"] is not None]
    note = None
    if run.status == "complete" and trained:
        note = _short(max(trained), planned)
    out: dict[str, Any] = {"note": note, "processes": processes}
    ranks = sorted((p for p in processes if p["role"] == "rank"), key=lambda p: p["rank"])
    if ranks:  # a torchrun job: its ranks, in rank order, with their place in the group
        out["ranks"] = [{**p, **_rank_meta(facts[p["trace"]])} for p in ranks]
    return out


def _rank_meta(read: _TraceFacts) -> dict[str, Any]:
    meta, group = read.meta, read.meta.distributed or {}
    return {
        "local_rank": group.get("local_rank", meta.local_rank),
        "world_size": group.get("world_size", meta.world_size),
        "backend": group.get("backend"),
        "device": group.get("device"),
    }


def _short(last_step: int | None, planned: int) -> str | None:
    """A run (or process) that ended before the requested steps says so."""
    if planned and (last_step or 0) < planned:
        done = last_step or 0
        return f"ended after {done} of {planned} steps"
    return None


OBSERVABLE = tuple(phase for phase in PHASES if phase not in LATENT_PHASES)
_WHY_MISSING = {
    "data": "no DataLoader batch seen (data read another way is not recorded)",
    "outputs": "no call of a model in training mode with gradients on (a forward under "
    "no_grad, in eval(), or outside any nn.Module is not recorded)",
    "loss": "backward() was never called on a scalar",
    "grads": "no trained parameter received a gradient",
    "weights": "no model with trained parameters was found",
    "optimizer": "no optimizer state (an optimizer without state, or hand-written updates)",
}
_SAMPLED_STEPS = 200  # coverage reads at most this many steps of a trace (evenly spread)


def _coverage(
    config: Config, legs: Sequence[Leg], facts: dict[str, _TraceFacts]
) -> list[dict[str, Any]]:
    """What the recording saw: per leg and process of run 0, the tensors of each observable
    phase at its training steps (fewest–most), and each phase never recorded with why."""
    out = []
    asked = set(config.record)
    for leg in legs:
        if leg.status == "skipped" or not leg.runs:
            continue
        for name, path in leg.runs[0].processes.items():
            read = facts.get(path)
            if read is None or read.counts is None:
                continue
            counts = read.counts
            missing = {
                phase: (
                    _WHY_MISSING[phase]
                    if phase in asked or not config.record
                    else "not asked for (record: " + ", ".join(config.record) + ")"
                )
                for phase in OBSERVABLE
                if not any(counts[phase])
            }
            out.append(
                {
                    "leg": leg.name,
                    "process": name,
                    "steps": read.last_step,
                    "sampled": read.sampled,
                    "tensors": {
                        phase: [min(values), max(values)]
                        for phase, values in counts.items()
                        if any(values)
                    },
                    "missing": missing,
                    "complete": not missing,
                }
            )
    return out


def _not_verified(canary: dict[str, Any] | None, observer: dict[str, Any] | None) -> str | None:
    """Why agreeing runs prove nothing: recording changed training, or the canary was
    missed (None: verified, or not checked)."""
    if observer is not None and not observer["agrees"]:
        return observer.get("why")
    if canary is not None and not canary["caught"]:
        return f"the canary was not caught: {canary.get('why')}"
    return None


def _strength(
    legs: Sequence[Leg], first: Divergence | None, confidence: float, max_rate: float | None
) -> dict[str, Any] | None:
    """``evidence``: k of N runs diverged, with the exact binomial interval of the rate.
    A divergence between runs: N runs compared at its record, k outside the largest group
    that agrees. None diverged: N is the complete runs of the leg with the fewest (every
    leg's runs agreed with each other). None where no run completed."""
    from ..evidence import percent, statement

    if first is not None and first.runs:
        sizes = [len(group) for group in first.runs]
        n, k = sum(sizes), sum(sizes) - max(sizes)
        return {**statement(k, n, confidence), "leg": first.leg}
    counts = [
        (sum(run.status == "complete" for run in leg.runs), leg.name)
        for leg in legs
        if leg.status != "skipped"
    ]
    n, leg_name = min(counts, default=(0, None))
    if n < 2:
        return None
    found = {**statement(0, n, confidence), "leg": leg_name}
    if max_rate is not None:  # --max-rate: was the bound reached (or -n too small)?
        found["max_rate"] = max_rate
        found["reached"] = found["rate_upper"] < max_rate
        if not found["reached"]:
            found["statement"] += f" — not below {percent(max_rate)}: -n caps the runs"
    return found


def build_report(
    config: Config,
    legs: Sequence[Leg],
    first: Divergence | None,
    divergences: Sequence[Divergence],
    across: Sequence[LegComparison],
    *,
    evidence: Evidence | None = None,
    measurement: Measurement | None = None,
    folder: Path,
    timings: dict[str, float],
    interrupted: bool = False,
    findings: Sequence[dict[str, Any]] = (),
    attribution: Sequence[dict[str, Any]] = (),
    untrained: str | None = None,
    golden: GoldenCheck | None = None,
    command: list[str] | None = None,
    replicas: ReplicaCheck | None = None,
    as_is: dict[str, Any] | None = None,
    confidence: float = 0.95,
    canary: dict[str, Any] | None = None,
    observer: dict[str, Any] | None = None,
    max_rate: float | None = None,
    recording: Recording | None = None,
    localized: Localized | None = None,
) -> dict[str, Any]:
    """Assemble the report; ``verdict`` and ``exit_code`` follow DESIGN.md's exit codes.

    ``untrained``: why the audit saw no training step — it fails (exit 3), never passes.
    ``golden``: the check against a golden trace (``reprocheck check``): a change there
    is the report's ``first_divergence`` when the runs agree among themselves.
    ``command``: a script's command line (``exec``): the report also says what its
    recorded names stand for (``config.models``, ``config.optimizers``).
    ``replicas``: the check of a data-parallel job's ranks within each run; replicas that
    disagree are a divergence (exit 1) even where the runs agree with each other.
    """
    runs = [run for leg in legs for run in leg.runs]
    failed = [run for run in runs if run.status in FAILED_RUN]
    config_errors = [run for run in runs if run.status == "config_error"]
    outside = [c for c in across if c.within_tolerance is False]
    unknown = [c for c in across if c.within_tolerance is None]
    changed = golden is not None and golden.matches is False
    unknown_golden = (
        (golden.comparison or {}).get("note") if golden and golden.matches is None else None
    )
    verdict, code, reason = decide(
        runs=len(runs),
        interrupted=interrupted,
        config_error=bool(config_errors),
        failed=bool(failed),
        untrained=untrained,
        diverged=first is not None
        or bool(outside)
        or changed
        or (replicas is not None and replicas.divergence is not None),
        not_comparable=unknown_golden or (unknown[0].note if unknown else None),
        not_verified=_not_verified(canary, observer),
    )
    by_leg = {d.leg: d for d in divergences}
    facts = _read_traces([leg for leg in legs if leg.status != "skipped"])
    recorded = {
        leg.name: _leg_records(leg, facts) if leg.status != "skipped" else (0, []) for leg in legs
    }
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "reprocheck": __version__,
        "verdict": verdict,
        "exit_code": code,
        "reason": reason,
        "interrupted": interrupted,
        "config": {
            "name": config.name,
            "path": config.path,
            "sha256": config.sha256,
            "seed": config.seed,
            "repeats": config.repeats,
            "steps": config.steps,
            "preset": config.determinism.preset,
            "record": list(config.record),
            # sparse (one digest per phase) or sampled (every M-th step) records
            "recording": (recording or Recording()).describe(),
            **_script(legs, command, facts),
        },
        "legs": [
            {
                "name": leg.name,
                "device": leg.device,
                "threads": leg.threads,
                "env": dict(leg.env),
                "versions": _versions(leg, facts),
                "compile": _compile_leg(leg, facts),
                "status": leg.status,
                "reason": leg.reason,
                "records": recorded[leg.name][0],
                "phases": recorded[leg.name][1],
                "first_divergence": (
                    {
                        "step": by_leg[leg.name].step,
                        "phase": by_leg[leg.name].phase,
                        "tensor": by_leg[leg.name].tensor,
                    }
                    if leg.name in by_leg
                    else None
                ),
                "runs": [
                    {
                        "run": run.run,
                        "status": run.status,
                        "steps": run.last_step,
                        "trace": run.trace,
                        "log": run.log,
                        "error": run.error,
                        "log_tail": run.log_tail,
                        "seconds": round(run.seconds, 3),
                        "forked": run.forked,
                        **_processes(run, config.steps, facts),
                    }
                    for run in leg.runs
                ],
            }
            for leg in legs
        ],
        "first_divergence": _first_divergence(first, golden, evidence, measurement),
        # sparse or sampled records: how replays found the exact step and the tensor
        "localized": localized.to_dict(recording or Recording()) if localized else None,
        "replicas": replicas.to_dict() if replicas is not None else None,
        "replica_divergence": (
            replicas.divergence.to_dict()
            if replicas is not None and replicas.divergence is not None
            else None
        ),
        "across_legs": [comparison_dict(c) for c in across],
        # what the runs prove: the divergence rate per run, bounded (reprocheck.evidence)
        "evidence": _strength(legs, first, confidence, max_rate),
        # what the recording saw at the training steps, and why a phase is missing
        "coverage": _coverage(config, legs, facts),
        # a reproducible verdict's proof that a difference would have been seen, and that
        # recording left training alone
        "canary": canary,
        "observer": observer,
        "findings": list(findings),
        "attribution": list(attribution),
        # a script's reproducible verdict under a preset: its two runs as its user runs it
        "as_is": as_is,
        "environment": _environment(legs, facts),
        "plot": _plot(legs, first, golden, facts),
        "golden": golden.to_dict() if golden is not None else None,
        "out_dir": str(folder),
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    return report


def _golden_losses(path: str) -> list[list[Any]]:
    try:
        with Trace(path) as trace:
            return [[step, value] for step, value in sorted(trace.losses().items())]
    except (TraceError, OSError):
        return []


def _plot(
    legs: Sequence[Leg],
    first: Divergence | None,
    golden: GoldenCheck | None,
    facts: dict[str, _TraceFacts],
) -> dict[str, Any] | None:
    """What the report's plot draws: each run's loss per step ([step, loss] pairs) in the
    leg that diverged (else the first that ran), from the process that diverged (else the
    first that trained), and the golden trace's, for a check."""
    active = [leg for leg in legs if leg.status != "skipped"]
    leg = next((x for x in active if first is not None and x.name == first.leg), None)
    leg = leg or (active[0] if active else None)
    if leg is None:
        return None
    process = first.process if first is not None else "main"

    def trained(path: str | None) -> bool:
        return path is not None and facts.get(path, _TraceFacts()).last_step is not None

    runs, paths = [], {}
    for run in leg.runs:
        path = run.processes.get(process)
        if not trained(path):
            path = next((p for p in run.processes.values() if trained(p)), run.trace)
        paths[run.run] = path
        runs.append(
            {"run": run.run, "losses": facts.get(path, _TraceFacts()).losses, "status": run.status}
        )
    reference = _golden_losses(golden.golden) if golden is not None and golden.golden else None
    return {
        "leg": leg.name,
        "process": process,
        "runs": runs,
        "golden": reference,
        "sketch_growth": _sketch_growth(first, paths, facts),
    }


def _sketch_growth(
    first: Divergence | None, paths: dict[int, str], facts: dict[str, _TraceFacts]
) -> list | None:
    """Max relative Δ per step over every recorded tensor between the first two groups of
    a divergence, where their traces carry sketches (multi-leg audits, tolerance checks):
    the growth in the weights and gradients, not only in the loss. None without them."""
    if first is None or len(first.runs) < 2:
        return None
    pair = [paths.get(group[0]) for group in first.runs[:2]]
    if not all(p is not None and facts.get(p, _TraceFacts()).sketched for p in pair):
        return None
    try:
        found = compare_sketches(pair[0], pair[1], Tolerance(), ("a", "b"), own=True)  # type: ignore[arg-type]
    except (TraceError, OSError):
        return None
    return [[step, rel] for step, rel in found.growth]


def _first_divergence(
    first: Divergence | None,
    golden: GoldenCheck | None,
    evidence: Evidence | None,
    measurement: Measurement | None,
) -> dict | None:
    """The first difference that decides the verdict: between the runs (with what the
    later stages found), else against the golden trace (``compared`` says which)."""
    if first is not None:
        evidence, measurement = evidence or Evidence(), measurement or Measurement()
        values = divergence_dict(
            first,
            diff=measurement.diff,
            zoom=measurement.zoom,
            variability=evidence.variability,
            generator=evidence.generator,
            seeding=evidence.seeding,
        )
        rank = ProcessName(first.process).rank
        if rank is not None:  # rank r of one run against rank r of the others
            values["rank"] = rank
        return {"compared": "runs", **values}
    if golden is None or golden.matches is not False:
        return None
    if golden.first_divergence is not None:  # bitwise: the first record that changed
        return {"compared": "golden", **golden.first_divergence}
    outside = (golden.comparison or {}).get("first_outside") or {}
    return {  # under the tolerance (another environment): the first record outside it
        "compared": "golden",
        "kind": "tolerance",
        "tolerance": (golden.comparison or {}).get("tolerance"),
        **outside,
    }


def _script(
    legs: Sequence[Leg], command: list[str] | None, facts: dict[str, _TraceFacts]
) -> dict[str, Any]:
    """For a script (``exec``, ``audit()``): its command and what the recorded names stand
    for — ``models`` and ``optimizers``, each ``[{"prefix": "model0.", "type": ...}]`` in
    creation order, as the first trace that trained recorded them."""
    if command is None:
        return {}
    out: dict[str, Any] = {"command": command} if command else {}
    for leg in legs:
        for run in leg.runs:
            for path in run.processes.values():
                read = facts.get(path, _TraceFacts())
                names = read.meta.exec
                if names and read.last_step is not None:
                    return {**out, **names}
    return out
