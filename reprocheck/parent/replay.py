"""The divergent step replayed: the real tensors' numeric difference, the zoom to the first
divergent op, a compiled leg's ladder (inductor → aot_eager → eager), and two legs' first
record outside the tolerance, measured."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..compare import (
    Divergence,
    LegComparison,
    Tolerance,
    compare_sketches,
    first_mismatch,
)
from ..config import Config
from ..contract import (
    capture_key,
)
from ..trace import Trace, TraceError
from .launch import Launcher, Leg, RunResult
from .stages import Measurement

if TYPE_CHECKING:
    pass

if TYPE_CHECKING:
    from .audit import AuditOptions, _Clock


ZOOM_ATTEMPTS = 3  # replays of a divergent step before calling it intermittent


def measure(launcher: Launcher, leg: Leg, divergence: Divergence, zoom: bool) -> Measurement:
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
        paths = replay(launcher, leg, chosen, divergence, zoom, attempt, traces, attempt == 0)
        if len(paths) < 2:
            measured["replay_error"] = replay_error(launcher, chosen)
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


def replay_error(launcher: Launcher, runs: list[int]) -> str:
    """Why the last capture of ``runs`` kept nothing: the first failed replay's error line."""
    errors = getattr(launcher, "replay_errors", {})
    run = next((run for run in runs if run in errors), None)
    if run is None:
        return "the replay kept no capture"
    return f"run #{run}: {errors[run]}"


def measure_across(launcher: Launcher, a: Leg, b: Leg, where: dict[str, Any]) -> dict[str, Any]:
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
                "replay_error": f"{leg.name}: {replay_error(launcher, [run])}",
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


def ladder_replay(
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


def rung_of(launcher: Launcher, leg: Leg, divergence: Divergence) -> str:
    """Replay the first two groups' runs through ``aot_eager`` (AOT autograd's graphs run
    by eager kernels, no inductor codegen): ``diverges``, ``repeats``, or ``failed``."""
    chosen, paths = ladder_replay(launcher, leg, divergence, "aot_eager")
    if len(paths) < 2:
        return "failed"
    key = capture_key(divergence.phase, divergence.tensor)
    answer = launcher.analyse(leg, {"captures": [paths[run] for run in chosen], "key": key})
    if not answer["found"]:
        return "failed"
    return "repeats" if answer["digests"][0] == answer["digests"][1] else "diverges"


def graph_output(launcher: Launcher, leg: Leg, divergence: Divergence) -> dict | None:
    """Replay both runs through reprocheck's digesting backend (inductor's code, each
    graph call's outputs digested): the first compiled graph output that differs, with
    the line its FX node came from; None where the replays could not say."""
    from ..compiled import BACKEND, first_difference

    chosen, paths = ladder_replay(launcher, leg, divergence, BACKEND)
    records = []
    for run in chosen:
        if run not in paths or not os.path.exists(paths[run] + ".graphs.json"):
            return None
        with open(paths[run] + ".graphs.json", encoding="utf-8") as handle:
            records.append(json.load(handle))
    return first_difference(records[0], records[1])


def ran_compiled(leg: Leg) -> bool:
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


def rung_text(ladder: dict[str, str]) -> str:
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


def replay(
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


def measure_stage(
    launcher: Launcher, leg: Leg, first: Divergence, options: AuditOptions
) -> Measurement:
    """The divergent step replayed: the numeric diff on the real tensors and the zoom;
    for a compiled leg, the ladder's rungs too."""
    measurement = measure(launcher, leg, first, options.zoom)
    if leg.compile and options.zoom:
        # a TorchDispatchMode runs compiled regions eagerly: never present its op
        # as the compiled model's, and a divergence it cannot repeat is the
        # compiled code's; the ladder's middle rung tells AOT autograd's graphs
        # from inductor's generated code
        ladder = {"inductor": "diverges", "aot_eager": rung_of(launcher, leg, first)}
        ladder["eager"] = "diverges" if measurement.zoom.get("op") else "repeats"
        zoom = {**measurement.zoom, "ladder": ladder, "rung": rung_text(ladder)}
        graph = graph_output(launcher, leg, first)
        if graph is not None:  # what the compiled code itself computed, first apart
            zoom["compiled_output"] = graph
        return replace(measurement, zoom=zoom)
    if options.zoom and measurement.zoom.get("op") and ran_compiled(leg):
        # the script compiles its model itself (no --compile leg): the op capture
        # ran the compiled regions eagerly, and the report says on which rung
        rung = (
            "eager (op capture): the model ran torch.compile'd, and the op capture "
            "runs its compiled regions eagerly; `--compile on` replays down the "
            "ladder from inductor"
        )
        return replace(measurement, zoom={**measurement.zoom, "rung": rung})
    return measurement


def across_stage(
    launcher: Launcher, config: Config, active: list[Leg], options: AuditOptions, clock: _Clock
) -> list[LegComparison]:
    """Each leg's reference run against the first leg's, under the tolerance; where they
    part, the two replayed and measured."""
    across: list[LegComparison] = []
    if clock.interrupted or len(active) < 2:
        return across
    reference = [reference_run(leg) for leg in active]
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
                measured = measure_across(launcher, active[0], active[index], where)
                compared = replace(compared, measured=measured)
            except KeyboardInterrupt:
                clock.interrupted = True
                across.append(compared)
                break
        across.append(compared)
    return across


def reference_run(leg: Leg) -> RunResult | None:
    """The leg's run to compare with other legs: the first that completed."""
    for run in leg.runs:
        if run.status == "complete":
            try:
                with Trace(run.trace, own=True):
                    return run
            except TraceError:
                continue
    return None
