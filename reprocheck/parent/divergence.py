"""Where a leg's runs first disagree, process by process, and what their traces say of it:
the tensors with more than one digest, the generator that differed, the seeding call behind
it; generators that differ while nothing observable does (latent)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..compare import (
    Divergence,
    first_divergence,
)
from ..doctor import rules
from ..trace import Trace, TraceError, committed_steps
from .launch import Leg, RunResult
from .stages import Evidence, Latent

if TYPE_CHECKING:
    pass

if TYPE_CHECKING:
    pass


def process_runs(leg: Leg) -> dict[str, list[RunResult]]:
    """Each process name → the leg's runs that have its trace, in run order."""
    names: dict[str, list[RunResult]] = {}
    for run in leg.runs:
        for name in run.processes:
            names.setdefault(name, []).append(run)
    return names


def traces_of(runs: list[RunResult], process: str) -> tuple[list[str], list[int]]:
    chosen = [r for r in runs if os.path.exists(r.processes.get(process, ""))]
    return [r.processes[process] for r in chosen], [r.run for r in chosen]


def leg_divergence(leg: Leg) -> Divergence | None:
    """The first observable divergence among the leg's runs, process by process (rank r of
    one run against rank r of the others); a process one run has and another lacks is a
    divergence of structure at its first step."""
    found: list[Divergence] = []
    for process, runs in process_runs(leg).items():
        traces, ids = traces_of(runs, process)
        if len(traces) >= 2:
            divergence = first_divergence(traces, ids, partial=True, own=True)
            if divergence is not None:
                found.append(replace(divergence, leg=leg.name, process=process))
        ended = [r for r in leg.runs if r.status in ("complete", "stopped")]
        if process != "main" and len(runs) < len(ended):
            found.append(missing_process(leg, process, runs, ended))
    return min(found, key=lambda d: (d.step, d.seq), default=None)


def missing_process(
    leg: Leg, process: str, having: list[RunResult], ended: list[RunResult]
) -> Divergence:
    have = [r.run for r in having]
    lack = [r.run for r in ended if r.run not in have]
    return Divergence(
        step=0,
        seq=0,
        phase="process",
        tensor=process,
        shape=(),
        dtype="",
        runs=[have, lack],
        sides=[None, None],
        kind="structure",
        leg=leg.name,
        process=process,
    )


def leg_latent(leg: Leg, process: str, last_step: int | None) -> Divergence | None:
    """The first generator state that differs between the leg's runs (of one process),
    at or before ``last_step``."""
    traces, ids = traces_of(process_runs(leg).get(process, []), process)
    if len(traces) < 2:
        return None
    found = first_divergence(traces, ids, partial=True, latent=True, last_step=last_step, own=True)
    return replace(found, leg=leg.name, process=process) if found is not None else None


def generator_section(latent: Divergence) -> dict[str, Any]:
    return {
        "name": latent.tensor,
        "step": latent.step,
        "runs": latent.runs,
        "process": latent.process,
    }


def leg_trained(leg: Leg) -> bool:
    """Some process of some run committed a training step (step 1 or later)."""
    for run in leg.runs:
        for path in run.processes.values():
            if committed_steps(path) > 1:
                return True
    return False


def evidence_at(leg: Leg, first: Divergence) -> Evidence:
    traces, ids = traces_of(leg.runs, first.process)
    reached = [(t, i) for t, i in zip(traces, ids) if committed_steps(t) > first.step]
    cause = leg_latent(leg, first.process, first.step)
    if cause is not None:
        cause = drawn_cause(traces, ids, cause, first.step)
    return Evidence(
        variability=tuple(
            variability([t for t, _ in reached], [i for _, i in reached], first.step)
        ),
        generator=generator_section(cause) if cause is not None else None,
        **seeding_evidence(leg, cause),
    )


def rng_digests(path: str, step: int) -> tuple[dict[str, bytes], dict[str, str] | None]:
    """The generator states a trace recorded at ``step`` (name → digest), and those its
    script started with (``meta.rng_start``, hex; None where unknown)."""
    with Trace(path, own=True) as trace:
        states = {r.name: r.digest for r in trace.records(step) if r.phase == "rng"}
        return states, trace.run_meta.rng_start


def drawn_cause(
    traces: list[str], ids: list[int], latent: Divergence, step: int
) -> Divergence | None:
    """Of the generators that differ between the runs by ``step``, the first one the
    script moved (drawn from, or re-seeded, since its first line): a generator seeded
    from entropy that nothing touches (NumPy's, under ``--preset none``) explains nothing
    and stays a latent difference. Where the start is unknown (a config's run, a forked
    child), every differing generator counts."""
    states = [rng_digests(path, step) for path in traces]
    for name in states[0][0]:
        differs = len({at_step.get(name) for at_step, _ in states}) > 1
        moved = any(
            start is None or start.get(name) != at_step[name].hex()
            for at_step, start in states
            if name in at_step
        )
        if not (differs and moved):
            continue
        if name == latent.tensor:
            return latent
        # no generator differs before the first one that does (``latent.step``)
        since = next(
            s
            for s in range(latent.step, step + 1)
            if len({rng_digests(p, s)[0].get(name) for p in traces}) > 1
        )
        groups: dict[bytes | None, list[int]] = {}
        for run, (at_step, _) in zip(ids, states):
            groups.setdefault(at_step.get(name), []).append(run)
        return replace(latent, tensor=name, step=since, runs=list(groups.values()))
    return None


# which calls seed which generator (as the rng phase names them)
SEEDS = {
    "torch.cpu": ("torch.manual_seed", "torch.seed"),
    "torch.cuda": ("torch.manual_seed", "torch.seed", "torch.cuda."),
    "numpy": ("np.random.seed",),
    "random": ("random.seed",),
}


GENERATORS = {
    "torch.cpu": "torch's CPU generator",
    "torch.cuda": "torch's CUDA generator",
    "numpy": "NumPy's global generator",
    "random": "Python's random",
}


def seeding_evidence(leg: Leg, cause: Divergence | None) -> dict[str, Any]:
    """Evidence's ``seeding`` (what to say) and ``seeding_call`` (the call, for the fix)."""
    text, call = seeding_of(leg, cause) if cause is not None else (None, None)
    return {"seeding": text, "seeding_call": call}


def seeding_calls(
    leg: Leg, divergence: Divergence
) -> list[tuple[list[dict[str, Any]], bool]] | None:
    """The seeding calls the first run of each of the divergence's first two groups
    recorded (``meta.seeding``) in its process, each with whether that run completed;
    None where a trace cannot say (unreadable, or the calls never written)."""
    by_run = {run.run: run for run in leg.runs}
    found = []
    for group in divergence.runs[:2]:
        try:
            with Trace(by_run[group[0]].processes[divergence.process], own=True) as trace:
                seeding, complete = trace.run_meta.seeding, trace.status == "complete"
        except (TraceError, KeyError):
            return None
        if not isinstance(seeding, list):  # never written: nothing can be said of it
            return None
        found.append(([c for c in seeding if isinstance(c, dict)], complete))
    return found


def seeding_of(leg: Leg, latent: Divergence) -> tuple[str | None, dict[str, Any] | None]:
    """The seeding call that made a generator differ between two runs, from the calls
    each run's trace recorded (``meta.seeding``): (what to say, with its line and both
    values; the call), or (None, None)."""
    family = latent.tensor.split(":")[0].split(".gauss")[0]
    calls, label = SEEDS.get(family), GENERATORS.get(family, latent.tensor)
    if calls is None or len(latent.runs) < 2:
        return None, None
    runs = [group[0] for group in latent.runs[:2]]
    read = seeding_calls(leg, latent)
    if read is None:
        return None, None
    a, b = ([c for c in made if c["call"].startswith(calls)] for made, _ in read)
    complete = [done for _, done in read]
    for x, y in zip(a, b):
        if x["value"] == "entropy" or y["value"] == "entropy":
            who = "every run" if x["value"] == y["value"] else f"run #{runs[1]}"
            call = x if x["value"] == "entropy" else y
            return (
                f"{who} re-seeded {label} from entropy at {call['where']} (`{call['call']}()`)",
                call,
            )
        if x["value"] != y["value"]:
            return f"`{x['call']}` got {x['value']} vs {y['value']} at {x['where']}", x
    if len(a) != len(b):
        longer, run = (a, runs[0]) if len(a) > len(b) else (b, runs[1])
        if not complete[1 if longer is a else 0]:
            return None, None  # the other run stopped early: it may not have got there yet
        call = longer[min(len(a), len(b))]
        return f"only run #{run} called `{call['call']}` (at {call['where']})", call
    if not a and all(complete):
        return f"the script never seeds {label}: it starts from entropy in every process", None
    return None, None


def entropy_generators(leg: Leg, first: Divergence) -> list[dict[str, Any]]:
    """RC015 from the seeding calls themselves, where nothing else named the cause: a
    generator the script built from entropy (``np.random.default_rng()``, ``torch.seed()``)
    in the process that diverged, at or before the divergent step, in every run compared —
    a local generator (a collator's) whose state no trace records."""
    read = seeding_calls(leg, first)
    if read is None or len(read) < 2:
        return []
    calls = [
        [
            c
            for c in made
            if c.get("value") == "entropy" and (c.get("step") is None or c["step"] <= first.step)
        ]
        for made, _ in read
    ]
    if not calls[0] or not calls[1]:
        return []
    call = calls[0][0]
    return [
        rules.RC015.fire(
            "entropy call", {"seeding": call}, call=call, step=first.step, phase=first.phase
        )
    ]


def latent_generators(legs: list[Leg]) -> list[Latent]:
    """Per leg and process: the first generator state that differs, and every generator
    that differs at that step."""
    found = []
    for leg in legs:
        for process in process_runs(leg):
            latent = leg_latent(leg, process, None)
            if latent is not None:
                traces, ids = traces_of(leg.runs, process)
                differing = variability(traces, ids, latent.step)
                names = tuple(item["tensor"] for item in differing if item["phase"] == "rng")
                found.append(Latent(latent, names or (latent.tensor,)))
    return found


def variability(traces: list[str], run_ids: list[int], step: int) -> list[dict[str, Any]]:
    """At a step: each tensor with more than one distinct digest across the runs, grouped."""
    from ..trace import Trace

    records: dict[int, dict[int, Any]] = {}
    for run, path in zip(run_ids, traces):
        with Trace(path, own=True) as trace:
            for record in trace.records(step):
                records.setdefault(record.seq, {})[run] = record
    out = []
    for seq in sorted(records):
        by_run = records[seq]
        groups: dict[bytes, list[int]] = {}
        for run, record in by_run.items():
            groups.setdefault(record.digest, []).append(run)
        if len(groups) > 1:
            first = next(iter(by_run.values()))
            out.append(
                {
                    "phase": first.phase,
                    "tensor": first.name,
                    "distinct": len(groups),
                    "runs": list(groups.values()),
                }
            )
    return out
