"""Golden traces for pre-merge checks: record once, check every change against it.

``record`` runs the normal audit with numeric sketches on, and keeps run 0 of the first
leg only if the audit was reproducible (a golden from a run that does not reproduce
would fail every check). The copy is compacted with ``VACUUM INTO``: digests, sketches and
the environment, no tensors — small enough to commit.

``check`` reruns the config and compares its run 0 with the golden:

* same environment (torch, CPU capability, threads, device, hasher) → bit for bit: the
  first divergent step, phase and tensor, and how far apart their sketches are;
* another environment → under the config's tolerance, from the sketches: the first
  step and tensor that leave it, the worst difference, and its growth over the steps.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from . import jsonout
from .compare import Tolerance, compare_sketches, comparison_dict, divergence_dict, first_divergence
from .config import Config
from .trace import Trace, TraceError, recover

# What must agree for a bitwise comparison to be fair.
ENVIRONMENT_KEYS = ("torch", "cpu_capability", "threads", "cuda", "cudnn", "device", "hasher")


class GoldenError(Exception):
    """A golden trace that cannot be used for this check (exit 2)."""


def reference_trace(report: dict[str, Any]) -> str | None:
    """Run 0 of the first leg that ran, if it completed."""
    for leg in report["legs"]:
        if leg["status"] == "skipped":
            continue
        for run in leg["runs"]:
            if run["status"] in ("complete", "stopped") and run["steps"] is not None:
                return run["trace"]
    return None


def write_golden(trace_path: str, golden_path: str | os.PathLike, config: Config) -> dict[str, Any]:
    """Compact a run's trace into ``golden_path``; returns its size facts."""
    golden = os.fspath(golden_path)
    folder = os.path.dirname(os.path.abspath(golden))
    if not os.path.isdir(folder):
        raise GoldenError(f"cannot write {golden}: folder {folder} does not exist")
    temporary = f"{golden}.tmp{os.getpid()}"
    if os.path.exists(temporary):
        os.remove(temporary)
    recover(trace_path)  # a stopped run's last logged steps
    source = sqlite3.connect(trace_path)
    try:
        source.execute("VACUUM INTO ?", (temporary,))
    finally:
        source.close()
    db = sqlite3.connect(temporary)
    with db:
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                (
                    "golden",
                    jsonout.dumps(
                        {
                            "recorded": time.time(),
                            "config_sha256": config.sha256,
                            "from": trace_path,
                        }
                    ),
                )
            ],
        )
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    os.replace(temporary, golden)
    with Trace(golden) as trace:
        steps, records = len(trace.steps), trace.record_count()
    size = os.path.getsize(golden)
    return {
        "path": golden,
        "bytes": size,
        "steps": steps,
        "records": records,
        "bytes_per_step": round(size / max(steps, 1)),
        "bytes_per_record": round(size / max(records, 1), 1),
    }


def environment_of(trace: Trace) -> dict[str, Any]:
    env = trace.meta.get("environment") or {}
    facts = {key: env.get(key) for key in ENVIRONMENT_KEYS}
    facts["device"] = trace.meta.get("device")
    facts["hasher"] = trace.meta.get("hasher")
    return facts


@dataclass
class GoldenCheck:
    """The outcome of comparing a fresh run with the golden trace."""

    golden: str
    current: str
    environment_differs: dict[str, list[Any]] = field(default_factory=dict)
    mode: str = "bitwise"  # bitwise | tolerance
    matches: bool = True
    first_divergence: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "golden": self.golden,
            "current": self.current,
            "mode": self.mode,
            "matches": self.matches,
            "environment_differs": self.environment_differs,
            "first_divergence": self.first_divergence,
            "comparison": self.comparison,
            "note": self.note,
        }


def check_against(
    golden_path: str, current_path: str, config: Config, any_config: bool
) -> GoldenCheck:
    """Compare a fresh run's trace with the golden: bitwise or under tolerance."""
    try:
        golden = Trace(golden_path)
    except TraceError as exc:
        raise GoldenError(str(exc)) from None
    with golden, Trace(current_path) as current:
        name = (golden.meta.get("config") or {}).get("name")
        if name != config.name and not any_config:
            raise GoldenError(
                f"{golden_path} is the golden trace of config {name!r}, not {config.name!r} — "
                "record one for this config, or pass --any-config"
            )
        if golden.status not in ("complete", "stopped"):
            raise GoldenError(f"{golden_path}: golden trace ended early ({golden.status})")
        theirs, ours = environment_of(golden), environment_of(current)
        if "golden" not in golden.meta:
            raise GoldenError(
                f"{golden_path} is a run's trace, not a golden trace — "
                "make one with `reprocheck record CONFIG -o golden.sqlite`"
            )
    result = GoldenCheck(golden=golden_path, current=current_path)
    result.environment_differs = {
        key: [theirs[key], ours[key]] for key in theirs if theirs[key] != ours[key]
    }
    tolerance = Tolerance(rtol=config.tolerance.rtol, atol=config.tolerance.atol)
    if not result.environment_differs:
        found = first_divergence([golden_path, current_path])
        result.matches = found is None
        if found is not None:
            found = dataclasses.replace(found, leg="golden vs current")
            result.first_divergence = divergence_dict(found)
            # how far apart: the sketches of the divergent record (both traces carry them)
            sides = [side.sketch for side in found.sides]
            if all(sides):
                a, b = sides[0], sides[1]
                gaps = [abs(x - y) / max(abs(x), abs(y), 1e-300) for x, y in zip(a[:3], b[:3])]
                result.first_divergence["sketch_rel_diff"] = max(gaps)
        comparison = compare_sketches(golden_path, current_path, tolerance, ("golden", "current"))
        result.comparison = comparison_dict(comparison)
    else:
        result.mode = "tolerance"
        comparison = compare_sketches(golden_path, current_path, tolerance, ("golden", "current"))
        result.comparison = comparison_dict(comparison)
        result.matches = comparison.within_tolerance
        differing = ", ".join(f"{k} {v[0]} → {v[1]}" for k, v in result.environment_differs.items())
        result.note = f"environment differs ({differing}): compared under {tolerance.describe()}"
    return result
