"""One audit, start to finish: plan the legs, run them, find the first divergence, measure
it on the real tensors, compare the legs, and assemble the report.

This is what ``reprocheck run`` calls; the CLI only parses, renders and exits.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..compare import Divergence, Tolerance, compare_sketches, first_divergence, numeric_diff
from ..config import Config
from ..trace import Trace, TraceError
from .launch import Launcher, Leg, RunResult, plan_legs

MIN_FREE_BYTES = 16 * 2**20


class OutputError(Exception):
    """The output folder cannot be written: said before any run starts."""


@dataclass
class AuditOptions:
    out: str = "reports"
    jobs: int | None = None
    timeout: float | None = None
    fail_fast: bool = True
    measure: bool = True  # replay the divergent step to diff the real tensors
    depth: str = "step"  # step | module | op: what each run records (issue: zoom)
    zoom: bool = True  # after a divergence, replay the step at op depth (localize.py)
    attribute: bool = True  # after a divergence, find the control that fixes it (doctor)


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


def _leg_divergence(leg: Leg) -> Divergence | None:
    runs = [r for r in leg.runs if r.steps > 0 and os.path.exists(r.trace)]
    if len(runs) < 2:
        return None
    found = first_divergence([r.trace for r in runs], [r.run for r in runs], partial=True)
    if found is not None:
        found.leg = leg.name
    return found


def _measure(launcher: Launcher, leg: Leg, divergence: Divergence) -> None:
    """Replay one run of the first two groups to the divergent step and diff the tensors."""
    import torch

    from ..fingerprint import fingerprint, sketch

    chosen = [group[0] for group in divergence.runs[:2]]
    key = (divergence.phase, divergence.tensor)
    paths = launcher.capture(leg, chosen, divergence.step, [key])
    tensors = {}
    for run, path in paths.items():
        saved = torch.load(path, map_location="cpu")
        tensor = saved.get(f"{divergence.phase}\t{divergence.tensor}")
        if tensor is not None:
            tensors[run] = tensor
    measured: dict[str, Any] = {"replayed_runs": chosen}
    if len(tensors) == 2:
        a, b = (tensors[run] for run in chosen)
        measured.update(numeric_diff(a, b))
        originals = {group[0]: side for group, side in zip(divergence.runs, divergence.sides)}
        same = [
            originals[run] is not None and fingerprint(tensors[run]).value == originals[run].digest
            for run in chosen
        ]
        measured["replay"] = "reproduced" if all(same) else "differed"
        measured["sketches"] = {str(run): sketch(tensors[run]).__dict__ for run in chosen}
    else:
        measured["replay"] = "failed"
    divergence.diff = measured


def run_audit(
    config: Config,
    options: AuditOptions,
    progress: Callable[[RunResult, int, int], None] | None = None,
    on_folder: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Run the audit and return the report (see :mod:`reprocheck.report.json`)."""
    from ..report.json import build_report

    started = time.monotonic()
    folder = make_audit_dir(options.out, config.name)
    if on_folder:
        on_folder(folder)
    legs = plan_legs(config)
    active = [leg for leg in legs if leg.status != "skipped"]
    launcher = Launcher(
        config,
        folder,
        jobs=options.jobs,
        timeout=options.timeout,
        with_sketch=len(active) > 1,  # sketches only where used: comparing legs
        fail_fast=options.fail_fast,
        progress=progress,
    )
    timings: dict[str, float] = {}
    interrupted = False
    try:
        launcher.run(legs)
    except KeyboardInterrupt:
        interrupted = True
    timings["runs_s"] = time.monotonic() - started

    divergences = [] if interrupted else [d for d in map(_leg_divergence, active) if d]
    first = min(divergences, key=lambda d: (d.step, d.seq), default=None)
    if first is not None and first.kind == "value" and options.measure:
        leg = next(leg for leg in active if leg.name == first.leg)
        measure_started = time.monotonic()
        try:
            _measure(launcher, leg, first)
        except KeyboardInterrupt:
            interrupted = True
        timings["measure_s"] = time.monotonic() - measure_started

    across = []
    if not interrupted and len(active) > 1:
        reference = [_reference_run(leg) for leg in active]
        tolerance = config.tolerance
        for index in range(1, len(active)):
            a, b = reference[0], reference[index]
            if a is None or b is None:
                continue
            across.append(
                compare_sketches(
                    a.trace,
                    b.trace,
                    Tolerance(rtol=tolerance.rtol, atol=tolerance.atol),
                    (active[0].name, active[index].name),
                )
            )
    timings["total_s"] = time.monotonic() - started
    return build_report(
        config,
        legs,
        first,
        divergences,
        across,
        folder=folder,
        timings=timings,
        interrupted=interrupted,
    )


def _reference_run(leg: Leg) -> RunResult | None:
    """The leg's run to compare with other legs: the first that completed."""
    for run in leg.runs:
        if run.status == "complete":
            try:
                with Trace(run.trace):
                    return run
            except TraceError:
                continue
    return None
