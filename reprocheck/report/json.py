"""The report as data: ``reprocheck.report/1``. The terminal view renders this same dict,
so what a person reads and what a machine reads never disagree."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__, jsonout
from ..compare import Divergence, LegComparison
from ..config import TRACE_PHASES, Config
from ..runner.launch import Leg
from ..trace import Trace, TraceError

SCHEMA = "reprocheck.report/1"

EXIT_REPRODUCIBLE, EXIT_DIVERGED, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# first_divergence fields from the replay's numeric diff, and from the zoom.
DIFF_KEYS = (
    "max_abs_diff",
    "max_rel_diff",
    "max_ulp",
    "elements_differing",
    "elements",
    "fraction_differing",
    "first_index",
    "replay",
    "replayed_runs",
    "replays",
    "replays_diverged",
    "replay_from",
    "sketches",
)
ZOOM_KEYS = (
    "module",
    "op",
    "source",
    "code",
    "stage",
    "source_is_forward_line",
    "cause",
    "cause_detail",
    "op_index",
    "ops_captured",
)

FAILED_RUN = ("failed", "timeout", "killed", "interrupted", "config_error")


def divergence_dict(divergence: Divergence) -> dict[str, Any]:
    """``first_divergence`` as the JSON report has it."""
    diff = divergence.diff
    out: dict[str, Any] = {
        "leg": divergence.leg,
        "process": divergence.process,
        "runs": divergence.runs,
        "step": divergence.step,
        "phase": divergence.phase,
        "tensor": divergence.tensor,
        "shape": list(divergence.shape),
        "dtype": divergence.dtype,
        "kind": divergence.kind,
        "digests": [side.digest.hex() if side else None for side in divergence.sides],
        "recorded": [
            None
            if side is None
            else {
                "phase": side.phase,
                "tensor": side.name,
                "shape": list(side.shape),
                "dtype": side.dtype,
            }
            for side in divergence.sides
        ],
    }
    for key in DIFF_KEYS:
        out[key] = diff.get(key)
    for key in ZOOM_KEYS:
        out[key] = divergence.zoom.get(key)
    out["variability"] = divergence.variability
    out["generator"] = divergence.generator
    if divergence.generator and not out["cause"]:  # no zoom said otherwise
        g = divergence.generator
        out["cause"] = "unseeded or re-seeded RNG"
        groups = " ≠ ".join(",".join(f"#{run}" for run in group) for group in g["runs"])
        out["cause_detail"] = (
            f"generator {g['name']} differed between runs from step {g['step']} ({groups})"
        )
    return out


def comparison_dict(comparison: LegComparison) -> dict[str, Any]:
    return {
        "pair": list(comparison.pair),
        "tolerance": comparison.tolerance,
        "within_tolerance": comparison.within_tolerance,
        "compared": comparison.compared,
        "identical": comparison.identical,
        "first_outside": comparison.first_outside,
        "worst": comparison.worst,
        "growth": [[step, rel] for step, rel in comparison.growth],
        "note": comparison.note,
    }


def _environment(legs: Sequence[Leg]) -> dict[str, Any]:
    for leg in legs:
        for run in leg.runs:
            try:
                with Trace(run.trace) as trace:
                    env = dict(trace.meta.get("environment") or {})
                    env["hasher"] = trace.meta.get("hasher")
                    return env
            except TraceError:
                continue
    return {}


def _leg_records(leg: Leg) -> tuple[int, list[str]]:
    """The records the leg's runs committed (every process), and the phases among them."""
    total, phases = 0, set()
    for run in leg.runs:
        for path in run.processes.values():
            try:
                with Trace(path) as trace:
                    total += trace.record_count()
                    phases |= trace.phases()
            except TraceError:
                continue
    return total, [p for p in TRACE_PHASES if p in phases]


def _process(name: str, path: str, planned: int) -> dict[str, Any]:
    """One process of a run: its role, rank or creation index, trace and steps."""
    role, number = "script", None
    kinds = (
        ("rank", "rank"),
        ("spawn", "spawn"),
        ("mp", "multiprocessing"),
        ("sub", "subprocess"),
    )
    for prefix, kind in kinds:
        tail = name.rsplit(".", 1)[-1]
        if tail.startswith(prefix) and tail[len(prefix) :].split("-")[-1].isdigit():
            role, number = kind, int(tail[len(prefix) :].split("-")[-1])
    out: dict[str, Any] = {"name": name, "role": role, "trace": path, "steps": None}
    out["rank" if role in ("rank", "spawn") else "index"] = number
    try:
        with Trace(path) as trace:
            out["steps"], out["status"] = trace.last_step, trace.status
    except TraceError as exc:
        out["status"], out["error"] = "unreadable", str(exc)
    out["note"] = _short(out["steps"], planned)
    return out


def _short(last_step: int | None, planned: int) -> str | None:
    """A run (or process) that ended before the requested steps says so."""
    if planned and (last_step or 0) < planned:
        done = last_step or 0
        return f"ended after {done} of {planned} steps"
    return None


def build_report(
    config: Config,
    legs: Sequence[Leg],
    first: Divergence | None,
    divergences: Sequence[Divergence],
    across: Sequence[LegComparison],
    *,
    folder: Path,
    timings: dict[str, float],
    interrupted: bool = False,
    findings: Sequence[dict[str, Any]] = (),
    attribution: Sequence[dict[str, Any]] = (),
    untrained: str | None = None,
) -> dict[str, Any]:
    """Assemble the report; ``verdict`` and ``exit_code`` follow DESIGN.md's exit codes.

    ``untrained``: why the audit saw no training step — it fails (exit 3), never passes.
    """
    runs = [run for leg in legs for run in leg.runs]
    failed = [run for run in runs if run.status in FAILED_RUN]
    config_errors = [run for run in runs if run.status == "config_error"]
    outside = [c for c in across if c.within_tolerance is False]
    unknown = [c for c in across if c.within_tolerance is None]
    reason = None
    if interrupted:
        verdict, code = "failed", EXIT_INTERRUPTED
    elif config_errors:
        verdict, code = "failed", EXIT_USAGE
    elif failed:
        verdict, code = "failed", EXIT_FAILED
    elif untrained:
        verdict, code, reason = "failed", EXIT_FAILED, untrained
    elif first is not None or outside:
        verdict, code = "diverged", EXIT_DIVERGED
    elif unknown:
        verdict, code, reason = "failed", EXIT_FAILED, unknown[0].note
    elif not runs:
        verdict, code = "failed", EXIT_USAGE
    else:
        verdict, code = "reproducible", EXIT_REPRODUCIBLE
    by_leg = {d.leg: d for d in divergences}
    recorded = {leg.name: _leg_records(leg) if leg.status != "skipped" else (0, []) for leg in legs}
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
        },
        "legs": [
            {
                "name": leg.name,
                "device": leg.device,
                "threads": leg.threads,
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
                        "note": _short(run.last_step, config.steps)
                        if run.status == "complete"
                        else None,
                        "processes": [
                            _process(name, path, config.steps)
                            for name, path in run.processes.items()
                        ],
                    }
                    for run in leg.runs
                ],
            }
            for leg in legs
        ],
        "first_divergence": divergence_dict(first) if first else None,
        "across_legs": [comparison_dict(c) for c in across],
        "findings": list(findings),
        "attribution": list(attribution),
        "environment": _environment(legs),
        "out_dir": str(folder),
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    return report


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the JSON report atomically (a reader never sees half a file)."""
    path = os.fspath(path)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        jsonout.dump(report, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(temporary, path)
