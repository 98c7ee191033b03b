"""What tests a reproducible verdict further: the canary run (a flipped bit the comparison
must find), the observer run (recording leaves training alone), and the as-is pair (a
script run as its user runs it)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compare import (
    first_divergence,
)
from ..config import Config
from ..contract import (
    OBSERVED,
    PHASE_DIGEST,
    Canary,
    Function,
)
from ..doctor import rules
from ..trace import Trace, TraceError, committed_steps
from .launch import Launcher, Leg, RunResult

if TYPE_CHECKING:
    pass
from .divergence import variability

if TYPE_CHECKING:
    from .audit import AuditOptions, _Clock


def checks_stage(
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
            canary, observer = self_checks(launcher, config, options, leg)
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
            as_is = as_is_pair(config, options, leg, folder)
    return canary, observer, as_is


def self_checks(
    launcher: Launcher, config: Config, options: AuditOptions, leg: Leg
) -> tuple[dict | None, dict | None]:
    """The canary and the observer runs, side by side (each one forked run of the leg):
    (the report's ``canary``, its ``observer``)."""
    run0 = leg.runs[0]
    step = 1 if run0.steps >= 2 else 0
    every = options.recording.every
    if every is not None:  # a step that is hashed: M, or 0 in a run too short for M
        step = every if run0.steps > every + 1 else 0
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
    sparse = options.recording.mode == "sparse"
    canary = (
        canary_section(results[".canary"], trained, step, sparse) if ".canary" in results else None
    )
    observer = observer_section(results[".observer"], trained) if ".observer" in results else None
    return canary, observer


def observer_section(result: RunResult, trained: dict[str, tuple[str, int]]) -> dict[str, Any]:
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
        found = state_difference(path, other)
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


def state_difference(recorded: str, observed: str) -> dict[str, Any] | None:
    """The first (step, phase, tensor) whose weights or optimizer digest differs between a
    recorded run and the observer run, over the steps both committed."""
    with Trace(recorded, own=True) as a, Trace(observed, own=True) as b:
        for step in sorted(set(a.steps) & set(b.steps)):
            theirs = {(r.phase, r.name): r.digest for r in b.records(step) if r.phase in OBSERVED}
            for record in a.records(step):
                key = (record.phase, record.name)
                if key in theirs and theirs[key] != record.digest:
                    return {"step": step, "phase": record.phase, "tensor": record.name}
    return None


def canary_section(
    result: RunResult, trained: dict[str, tuple[str, int]], step: int, sparse: bool = False
) -> dict[str, Any]:
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
        # a sparse trace folds the phase: the flip shows in the weights' one digest
        tensor = PHASE_DIGEST if sparse else planted["tensor"]
        expected = {"step": step, "phase": "weights", "tensor": tensor}
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


def as_is_pair(config: Config, options: AuditOptions, leg: Leg, folder: Path) -> dict[str, Any]:
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
    from .audit import Auditor  # (which runs audits: imported when one is made)

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
    early = drawn_before_seeding(runs) if (where["step"] or 0) <= 1 else None
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


def drawn_before_seeding(runs: list[dict[str, Any]]) -> tuple[dict, dict] | None:
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
