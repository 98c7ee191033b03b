"""The report as data: ``reprocheck.report/1``. The terminal view renders this same dict,
so what a person reads and what a machine reads never disagree."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..compare import Divergence, LegComparison
from ..config import Config
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


def _leg_records(leg: Leg) -> int:
    total = 0
    for run in leg.runs:
        try:
            with Trace(run.trace) as trace:
                total += trace.record_count()
        except TraceError:
            continue
    return total


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
) -> dict[str, Any]:
    """Assemble the report; ``verdict`` and ``exit_code`` follow DESIGN.md's exit codes."""
    runs = [run for leg in legs for run in leg.runs]
    failed = [run for run in runs if run.status in FAILED_RUN]
    config_errors = [run for run in runs if run.status == "config_error"]
    outside = [c for c in across if not c.within_tolerance]
    if interrupted:
        verdict, code = "failed", EXIT_INTERRUPTED
    elif config_errors:
        verdict, code = "failed", EXIT_USAGE
    elif failed:
        verdict, code = "failed", EXIT_FAILED
    elif first is not None or outside:
        verdict, code = "diverged", EXIT_DIVERGED
    elif not runs:
        verdict, code = "failed", EXIT_USAGE
    else:
        verdict, code = "reproducible", EXIT_REPRODUCIBLE
    by_leg = {d.leg: d for d in divergences}
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "reprocheck": __version__,
        "verdict": verdict,
        "exit_code": code,
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
                "records": _leg_records(leg) if leg.status != "skipped" else 0,
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
        json.dump(report, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(temporary, path)
