"""Sparse and sampled records: the exact first divergent step, then its tensor, by replays.

A verdict's runs recorded ``--record sparse`` hold one digest per phase and step (every
tensor of the phase folded in record order): their comparison finds the exact first
divergent step and phase, not the tensor. Runs recorded ``--every M`` hashed every M-th
step (and the last): their comparison finds the first sampled step where they differ,
s, so the first divergence lies in the interval after the sampled step before it.

Two runs that disagree there (one of each group) are replayed:

1. (``--every M``) to step s, each step hashed (sparse): the exact step k — a config's
   runs resume from reprocheck's checkpoints at or before the interval, a script's rerun
   from their start;
2. to step k in full: the first divergent tensor, by the same comparison as any audit.

The stages after it (the measurement, the zoom, attribution) then read the two full
replays as the leg's runs. A replay pair that agrees — a source that does not repeat —
leaves the divergence where the records put it, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..compare import Divergence
from ..contract import Recording
from ..trace import Trace
from .divergence import leg_divergence
from .launch import Launcher, Leg, RunResult


@dataclass(frozen=True)
class Localized:
    """What the replays found: the leg with the two full replays as its runs and their
    divergence (None where the replays did not find one), and what the report says."""

    leg: Leg | None
    divergence: Divergence | None
    recorded: dict[str, Any]  # the divergence as the records showed it
    interval: tuple[int, int] | None  # (sampled step agreeing, sampled step differing]
    step: int | None  # the exact step (sparse: the recorded one; sampled: the replays')
    replays: int  # replay runs made
    why: str | None = None  # why the tensor is not named
    # sampled: the first step the replays hashed every step from (a script's: 0; a
    # config's: the checkpoint they resumed from); the steps before it were compared
    # where the records hashed them only
    every_step_from: int | None = None

    def to_dict(self, recording: Recording) -> dict[str, Any]:
        return {
            "recording": recording.describe(),
            "recorded": self.recorded,
            "interval": list(self.interval) if self.interval else None,
            "step": self.step,
            "replays": self.replays,
            "named": self.divergence is not None,
            "why": self.why,
            "every_step_from": self.every_step_from,
        }


def _pair(first: Divergence) -> list[int]:
    """One run of each of the first two groups that recorded different things."""
    return [first.runs[0][0], first.runs[1][0]]


def _leg_of(leg: Leg, results: dict[int, RunResult]) -> Leg:
    return replace(leg, runs=tuple(results[run] for run in sorted(results)))


def localize_stage(
    launcher: Launcher, leg: Leg, first: Divergence, recording: Recording
) -> Localized:
    """The exact step and the tensor of a sparse or sampled leg's first divergence."""
    recorded = {"step": first.step, "phase": first.phase, "process": first.process}
    if len(first.runs) < 2:  # a run that lacks a process: nothing to replay against
        return Localized(None, None, recorded, None, first.step, 0, "no two runs to replay")
    runs, replays, step = _pair(first), 0, first.step
    interval, every_step_from = None, None
    if recording.every is not None and first.step > 0:
        previous = (first.step - 1) // recording.every * recording.every
        interval = (previous, first.step)
        sampled = launcher.replays(
            leg, runs, first.step, f"every-s{first.step}", Recording("sparse"), previous
        )
        replays += len(sampled)
        if not all(r.status == "complete" for r in sampled.values()):
            return Localized(None, None, recorded, interval, None, replays, _failed(sampled))
        found = leg_divergence(_leg_of(leg, sampled))
        every_step_from = _first_hashed(sampled)
        if found is None:
            why = f"the replays of runs {_runs(runs)} agreed up to step {first.step}"
            return Localized(None, None, recorded, interval, None, replays, why, every_step_from)
        step = found.step
    full = launcher.replays(leg, runs, step, f"full-s{step}", None, step - 1)
    replays += len(full)
    if not all(r.status == "complete" for r in full.values()):
        why = _failed(full)
        return Localized(None, None, recorded, interval, step, replays, why, every_step_from)
    named_leg = _leg_of(leg, full)
    found = leg_divergence(named_leg)
    if found is None or found.step != step:
        why = (
            f"the full replays of runs {_runs(runs)} agreed up to step {step}"
            if found is None
            else f"the full replays differ first at step {found.step}, not {step}"
        )
        return Localized(None, None, recorded, interval, step, replays, why, every_step_from)
    return Localized(named_leg, found, recorded, interval, step, replays, None, every_step_from)


def _first_hashed(results: dict[int, RunResult]) -> int:
    """The step from which every replay hashed every step to its end (a replay resumed
    from a checkpoint records its step 0, then the steps from the checkpoint on)."""
    first = 0
    for result in results.values():
        with Trace(result.trace, own=True) as trace:
            steps = trace.steps
        start = steps[-1] + 1 if steps else 0
        for step in reversed(steps):
            if step != start - 1:
                break
            start = step
        first = max(first, start)
    return first


def _runs(runs: list[int]) -> str:
    return " and ".join(f"#{run}" for run in runs)


def _failed(results: dict[int, RunResult]) -> str:
    bad = next(r for r in results.values() if r.status != "complete")
    return f"the replay of run #{bad.run} {bad.status}: {bad.error}"
