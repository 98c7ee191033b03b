"""Replicas within a run: the ranks of a data-parallel job must hold bitwise the same
parameters, buffers and optimizer state after every step, and the same gradients at every
optimizer step (DDP's all-reduce has made them so).

The check reads the rank traces a run already wrote (every digest is there), after the
run: it costs the training nothing. Ranks are replicas when their step-0 weights agree
record for record — DDP broadcasts rank 0's at construction; FSDP's shards (or any
non-replicated layout) differ there, and are then compared run to run only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from .contract import ProcessName
from .doctor import rules
from .trace import Trace, TraceError

REPLICA_PHASES = ("grads", "weights", "optimizer")  # what data parallelism keeps equal


@dataclass
class ReplicaDivergence:
    """The first record the replicas of one run disagree on."""

    leg: str
    run: int
    step: int
    phase: str
    tensor: str
    kind: str  # parameter | buffer | optimizer | grad
    ranks: list[list[int]]  # ranks grouped by the digest they recorded
    digests: list[str]
    # at that step, whether each kind agreed on every record (None: none recorded)
    agreed: dict[str, bool | None] = field(default_factory=dict)
    runs: list[int] = field(default_factory=list)  # every run whose replicas split there

    def to_dict(self) -> dict[str, Any]:
        return {
            "leg": self.leg,
            "run": self.run,
            "runs": self.runs,
            "step": self.step,
            "phase": self.phase,
            "tensor": self.tensor,
            "kind": self.kind,
            "ranks": self.ranks,
            "digests": self.digests,
            "agreed": self.agreed,
        }


@dataclass
class ReplicaCheck:
    """What the check covered, and the first disagreement (None: replicas identical)."""

    checked: bool
    note: str | None = None
    ranks: int = 0
    runs: list[int] = field(default_factory=list)
    steps: int = 0
    records: int = 0
    divergence: ReplicaDivergence | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "note": self.note,
            "ranks": self.ranks,
            "runs": self.runs,
            "steps": self.steps,
            "records": self.records,
            "identical": self.checked and self.divergence is None,
        }


def _kind(phase: str, name: str, buffers: set[str]) -> str:
    if phase == "comm":
        return "comm"
    if phase == "grads":
        return "grad"
    if phase == "optimizer":
        return "optimizer"
    return "buffer" if name in buffers else "parameter"


def _step_records(trace: Trace, step: int) -> dict[tuple[str, str], bytes]:
    """The step's replicated records, and its collectives' outputs (which every rank
    receives alike: they say whether a split came before or after communication)."""
    return {
        (r.phase, r.name): r.digest
        for r in trace.records(step)
        if r.phase in REPLICA_PHASES or (r.phase == "comm" and ".out" in r.name)
    }


def _without(
    records: dict[tuple[str, str], bytes], buffers: set[str]
) -> dict[tuple[str, str], bytes]:
    return {k: v for k, v in records.items() if not (k[0] == "weights" and k[1] in buffers)}


def check_run(leg: str, run: int, rank_traces: dict[int, str]) -> tuple[ReplicaCheck, str | None]:
    """Compare one run's ranks step by step. Returns the check and, where the ranks are
    not replicas, why they were not compared."""
    with contextlib.ExitStack() as stack:
        try:
            traces = {
                r: stack.enter_context(Trace(path, own=True))
                for r, path in sorted(rank_traces.items())
            }
        except TraceError as exc:
            return ReplicaCheck(False, f"a rank's trace cannot be read: {exc}"), None
        ranks = sorted(traces)
        common = sorted(set.intersection(*(set(t.steps) for t in traces.values())))
        if not common or common[0] != 0:
            return ReplicaCheck(False, "the ranks share no recorded step 0"), None
        buffers = set()
        for t in traces.values():
            buffers |= set(((t.run_meta.distributed or {}).get("buffers")) or [])
        first = {r: _step_records(t, 0) for r, t in traces.items()}

        def parameters(records: dict[tuple[str, str], bytes]) -> dict[tuple[str, str], bytes]:
            # step 0 is taken once the first forward has run: buffers may have moved
            return {k: v for k, v in records.items() if k[0] == "weights" and k[1] not in buffers}

        synced = any((t.run_meta.distributed or {}).get("sync_buffers") for t in traces.values())
        if synced:  # DDP copies rank 0's buffers in at each forward: after it they differ
            first = {r: _without(records, buffers) for r, records in first.items()}
        start = parameters(first[ranks[0]])
        for r in ranks[1:]:
            if parameters(first[r]) != start:
                why = (
                    "the ranks hold different parameters at step 0 (shards, as with FSDP, "
                    "or a layout that is not replicated): compared run to run, rank by rank"
                )
                return ReplicaCheck(False, why, ranks=len(ranks)), why
        note = (
            "buffers not compared: DDP copies rank 0's into every rank at each forward"
            if synced and buffers
            else None
        )
        records = 0
        for step in common:
            by_rank = first if step == 0 else {r: _step_records(t, step) for r, t in traces.items()}
            if synced and step:
                by_rank = {r: _without(records, buffers) for r, records in by_rank.items()}
            order = list(by_rank[ranks[0]])
            for r in ranks[1:]:
                order += [k for k in by_rank[r] if k not in by_rank[ranks[0]]]
            records += len(order)
            agreed: dict[str, bool | None] = {}
            split = None
            for key in order:
                groups: dict[bytes | None, list[int]] = {}
                for r in ranks:
                    groups.setdefault(by_rank[r].get(key), []).append(r)
                kind = _kind(key[0], key[1], buffers)
                same = len(groups) == 1
                agreed[kind] = same and agreed.get(kind, True) is not False
                if not same and split is None and kind != "comm":
                    split = (key, kind, groups)
            if split is not None:
                (phase, name), kind, groups = split
                divergence = ReplicaDivergence(
                    leg,
                    run,
                    step,
                    phase,
                    name,
                    kind,
                    list(groups.values()),
                    [d.hex() if d is not None else "" for d in groups],
                    {
                        k: agreed.get(k)
                        for k in ("comm", "grad", "parameter", "buffer", "optimizer")
                        if k != "comm" or k in agreed
                    },
                    [run],
                )
                return ReplicaCheck(
                    True, note, len(ranks), [run], step + 1, records, divergence
                ), None
        return ReplicaCheck(True, note, len(ranks), [run], len(common), records), None


def rank_of(process: str) -> int | None:
    """``rank3`` → 3 (a torchrun rank's process name); else None."""
    return ProcessName(process).rank


def check_legs(legs: list[Any]) -> ReplicaCheck | None:
    """Every run's replicas (runs with two or more rank processes); None if no run has
    ranks. The first divergence (by step) wins; the runs that split there are listed."""
    checks = []
    for leg in legs:
        for result in leg.runs:
            ranks = {
                rank_of(name): path
                for name, path in result.processes.items()
                if rank_of(name) is not None
            }
            if len(ranks) > 1:
                checks.append(check_run(leg.name, result.run, ranks)[0])
    if not checks:
        return None
    skipped = [c for c in checks if not c.checked]
    if skipped:
        return ReplicaCheck(False, skipped[0].note, ranks=skipped[0].ranks)
    found = [c.divergence for c in checks if c.divergence is not None]
    first = min(found, key=lambda d: (d.step, d.run), default=None)
    if first is not None:
        first.runs = sorted(
            d.run
            for d in found
            if (d.step, d.phase, d.tensor) == (first.step, first.phase, first.tensor)
        )
    return ReplicaCheck(
        True,
        next((c.note for c in checks if c.note), None),
        max(c.ranks for c in checks),
        sorted(r for c in checks for r in c.runs),
        max(c.steps for c in checks),
        sum(c.records for c in checks),
        first,
    )


def finding(divergence: ReplicaDivergence) -> dict[str, Any]:
    """The rule a replica divergence matches, with its fix: the first in the catalog whose
    ``replicas`` way it triggers (RC022 buffers, RC023 the update, RC024 gradients)."""
    rule = next(r for r in rules.RULES if r.fires("replicas", divergence=divergence))
    d = divergence
    evidence = {"step": d.step, "tensor": d.tensor, "ranks": d.ranks}
    return rule.fire("replicas", evidence, divergence=divergence)
