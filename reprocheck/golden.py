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

A golden is hostile input (a pull request may change it): it is read as a foreign trace
(see :class:`~reprocheck.trace.Trace`: read-only, immutable, no SQL from it run, bounded),
and one without a training step (step 1 or later) is no pass: exit 3 before any run.
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
from .contract import Recording
from .trace import Trace, TraceError, recover
from .verdict import EXIT_FAILED, EXIT_USAGE

# What must agree for a bitwise comparison to be fair.
ENVIRONMENT_KEYS = ("torch", "cpu_capability", "threads", "cuda", "cudnn", "device", "hasher")


class GoldenError(Exception):
    """A golden trace that cannot be used for this check: exit 2, or ``exit_code`` (3 for a
    golden that holds nothing to check against)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    script = _recorded_script(trace_path)  # read (and checked) before it is copied
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
                            "script": script,
                        }
                    ),
                )
            ],
        )
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    os.replace(temporary, golden)
    with Trace(golden) as trace:  # read back as any golden is: a foreign trace
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


def script_identity(command: list[str] | None) -> dict[str, Any] | None:
    """A script's golden identity: its path as the user named it (relative to the folder
    the command ran in, so a clone elsewhere matches) and its arguments."""
    if not command:
        return None
    script, *arguments = command
    if script == "-m":
        return {"script": f"-m {arguments[0]}", "arguments": arguments[1:]}
    return {"script": os.path.relpath(script), "arguments": arguments}


def precheck(golden_path: str, config: Config, command: list[str] | None, any_config: bool) -> None:
    """Before any run: is this golden one of this config (or script)? GoldenError if not."""
    with _open_golden(golden_path) as golden:
        _check_identity(golden, golden_path, config, command, any_config)
        _check_trained(golden, golden_path)


def golden_recording(golden_path: str) -> Recording:
    """How the golden's runs recorded (a check records the same way)."""
    with _open_golden(golden_path) as golden:
        return Recording.of(golden.run_meta.recording)


def _open_golden(golden_path: str) -> Trace:
    """The golden, read as the foreign trace it is (never written, no file made beside it)."""
    try:
        return Trace(golden_path, own=False)
    except TraceError as exc:
        raise GoldenError(str(exc)) from None


def _check_trained(golden: Trace, golden_path: str) -> None:
    """A golden without a training step (none, or step 0 alone: the state before any
    optimizer step) checks nothing: no pass, exit 3."""
    if not any(step >= 1 for step in golden.steps):
        raise GoldenError(f"{golden_path}: the golden holds no training step", EXIT_FAILED)


def _check_identity(
    golden: Trace, golden_path: str, config: Config, command: list[str] | None, any_config: bool
) -> None:
    if golden.run_meta.golden is None:
        raise GoldenError(
            f"{golden_path} is a run's trace, not a golden trace — make one with "
            "`reprocheck record CONFIG -o golden.sqlite` (or `… -- python train.py`)"
        )
    name = (golden.run_meta.config or {}).get("name")
    if name != config.name and not any_config:
        raise GoldenError(
            f"{golden_path} is the golden trace of config {name!r}, not {config.name!r} — "
            "record one for this config, or pass --any-config"
        )
    theirs = (golden.run_meta.golden or {}).get("script")
    if (theirs is None) != (command is None):
        kind = "a script's" if theirs is not None else "a config's"
        raise GoldenError(
            f"{golden_path} is {kind} golden trace: check it with what recorded it "
            "(`reprocheck check CONFIG --against G` or `… -- python train.py`)"
        )
    ours = script_identity(command)
    moved = theirs is not None and ours is not None and theirs["script"] != ours["script"]
    if moved and not any_config:
        raise GoldenError(
            f"{golden_path} is the golden trace of {theirs['script']}, not "
            f"{ours['script']} — record one for this script, or pass --any-config"
        )


def _script_changes(golden: Trace, current: Trace, config: Config) -> dict[str, list[Any]]:
    """What changed in a script's command since its golden (:func:`precheck` made sure
    both are a script's, and the same script unless ``--any-config``)."""
    theirs = (golden.run_meta.golden or {}).get("script")
    ours = script_identity(current.run_meta.command)
    if theirs is None or ours is None:
        return {}
    changes: dict[str, list[Any]] = {}
    if theirs["script"] != ours["script"]:
        changes["script"] = [theirs["script"], ours["script"]]
    if theirs["arguments"] != ours["arguments"]:
        changes["arguments"] = [theirs["arguments"], ours["arguments"]]
    recorded = (golden.run_meta.golden or {}).get("config_sha256")
    if recorded != config.sha256:
        changes["script_sha256"] = [recorded, config.sha256]
    return changes


def _package_drift(
    theirs: dict[str, str] | None, ours: dict[str, str] | None
) -> dict[str, list[str]]:
    """The distributions both runs imported, at other versions (name → [golden, now])."""
    if not theirs or not ours:
        return {}
    return {
        name: [theirs[name], ours[name]]
        for name in sorted(set(theirs) & set(ours))
        if theirs[name] != ours[name]
    }


def _recorded_script(trace_path: str) -> dict[str, Any] | None:
    with Trace(trace_path, own=True) as trace:  # the audit's own run
        return script_identity(trace.run_meta.command)


def environment_of(trace: Trace) -> dict[str, Any]:
    env = trace.run_meta.environment or {}
    facts = {key: env.get(key) for key in ENVIRONMENT_KEYS}
    facts["device"] = trace.run_meta.device
    facts["hasher"] = trace.run_meta.hasher
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
    # a script's golden: what changed in the command since it was recorded (arguments,
    # the script's content), each [golden, current]; compared all the same
    changes: dict[str, list[Any]] = field(default_factory=dict)
    # distributions both runs imported whose versions differ: name → [golden, current]
    packages_differ: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": self.changes,
            "packages_differ": self.packages_differ,
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
    # the run is over: its trace, finished, is read as the golden is (immutable)
    with _open_golden(golden_path) as golden, Trace(current_path) as current:
        _check_identity(golden, golden_path, config, current.run_meta.command, any_config)
        _check_trained(golden, golden_path)
        if golden.status not in ("complete", "stopped"):
            raise GoldenError(f"{golden_path}: golden trace ended early ({golden.status})")
        recorded = [Recording.of(t.run_meta.recording) for t in (golden, current)]
        if recorded[0] != recorded[1]:
            raise GoldenError(
                f"{golden_path}: the golden was recorded {recorded[0].describe()}, this check "
                f"{recorded[1].describe()}: check with the golden's --record and --every"
            )
        changes = _script_changes(golden, current, config)
        drift = _package_drift(golden.run_meta.packages, current.run_meta.packages)
        theirs, ours = environment_of(golden), environment_of(current)
    result = GoldenCheck(
        golden=golden_path, current=current_path, changes=changes, packages_differ=drift
    )
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
