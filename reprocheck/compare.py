"""Traces → the first divergence within a leg, and how far legs are apart.

Within a leg runs must agree bit for bit: the first divergence is the smallest
(step, record order) where any run's digest differs from run 0's — any two runs that
disagree there cannot both agree with run 0 — found by one join per pair of traces,
stopping at the first mismatch. Across legs (devices, thread counts, another machine)
digests are not expected to agree; the numeric sketches are compared under a tolerance.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .causes import Cause
from .trace import (
    DB_ERRORS,
    Record,
    Trace,
    TraceError,
    attach_traces,
    query_error,
    split_digests,
    unpack_ids,
)

if TYPE_CHECKING:  # torch is imported where tensors are compared: a verdict reads no tensor
    import torch


@dataclass(frozen=True)
class Divergence:
    """Where the runs of a leg first disagree, and how they group there. A stage result:
    later stages (measurement, zoom, attribution) add values of their own beside it."""

    step: int
    seq: int
    phase: str
    tensor: str
    shape: tuple[int, ...]
    dtype: str
    runs: list[list[int]]  # run indices grouped by what they recorded there
    sides: list[Record | None]  # one record per group (None: the group has no record there)
    kind: str = "value"  # value: digests differ · structure: names/shapes/counts differ
    leg: str | None = None
    process: str = "main"  # which of each run's processes (``main``, ``mp1``, ``rank0`` …)


def _connect(*paths: str, own: bool = False) -> sqlite3.Connection:
    """An in-memory connection with each trace attached read-only as t0, t1, ...: inert and
    bounded as a :class:`Trace` is (``immutable`` unless the audit's ``own``)."""
    return attach_traces(paths, own)


def _tensor_table(db: sqlite3.Connection, alias: str) -> list[tuple]:
    return db.execute(
        f"SELECT id, phase, name, shape, dtype FROM {alias}.tensors ORDER BY id"
    ).fetchall()


def first_mismatch(
    path_a: str,
    path_b: str,
    last_step: int,
    from_step: int = 0,
    latent: bool = False,
    own: bool = False,
) -> tuple[int, int] | None:
    """(step, seq) of the first record, in steps ``from_step..last_step``, where two traces
    differ: among the observable records, or with ``latent`` among the generator states.
    ``own``: both are the audit's own traces (see :class:`Trace`)."""
    try:
        db = _connect(path_a, path_b, own=own)
    except DB_ERRORS as exc:
        raise query_error(f"{path_a} or {path_b}", None, exc, "not a reprocheck trace") from None
    try:
        return _first_mismatch(db, last_step, from_step, latent)
    except DB_ERRORS as exc:
        raise query_error(f"{path_a} or {path_b}", db, exc) from None
    except ValueError as exc:  # a blob the readers' checks did not see (a live trace's)
        raise TraceError(f"{path_a} or {path_b}: corrupted trace ({exc})") from None
    finally:
        db.close()


def _first_mismatch(
    db: sqlite3.Connection, last_step: int, from_step: int, latent: bool
) -> tuple[int, int] | None:
    ids, digests = ("latent_tensors", "latent_digests") if latent else ("tensors", "digests")
    same_ids = _tensor_table(db, "t0") == _tensor_table(db, "t1")
    # One join over the steps: equal blobs mean every record of the step is equal.
    # Where tensor ids were assigned differently, the id blobs differ while the
    # records may not: then each step is compared by what the ids stand for.
    same = f"y.{digests} = x.{digests} AND y.{ids} = x.{ids}" if same_ids else "0"
    query = (
        f"SELECT x.step, x.{ids}, x.{digests}, y.{ids}, y.{digests}, length(x.tensors) "
        "FROM t0.records x LEFT JOIN t1.records y ON y.step = x.step "
        f"WHERE x.step BETWEEN ? AND ? AND NOT coalesce({same}, 0) ORDER BY x.step"
    )
    keys = None if same_ids else [_tensor_keys(db, "t0"), _tensor_keys(db, "t1")]
    rows = db.execute(query, (from_step, last_step))
    for step, ids_a, digests_a, ids_b, digests_b, observed_bytes in rows:
        seq = _first_difference(ids_a, digests_a, ids_b, digests_b, keys)
        if seq is not None:  # latent records are numbered after the observable ones
            return step, seq + (observed_bytes // 4 if latent else 0)
        if same_ids:
            raise sqlite3.DatabaseError(f"step {step}: unequal blobs with equal records")
    return None


def _tensor_keys(db: sqlite3.Connection, alias: str) -> dict[int, tuple]:
    return {row[0]: tuple(row[1:]) for row in _tensor_table(db, alias)}


def _first_difference(
    ids_a: bytes,
    digests_a: bytes,
    ids_b: bytes | None,
    digests_b: bytes | None,
    keys: list[dict[int, tuple]] | None,
) -> int | None:
    """The first record (seq) where two steps differ; None if they are equal."""
    if ids_b is None or digests_b is None:  # the step is missing in b
        return 0
    a, b = unpack_ids(ids_a), unpack_ids(ids_b)
    da, dbs = split_digests(digests_a), split_digests(digests_b)
    for seq in range(min(len(a), len(b))):
        if da[seq] != dbs[seq]:
            return seq
        if keys is None:
            if a[seq] != b[seq]:
                return seq
        elif keys[0].get(a[seq]) != keys[1].get(b[seq]):
            return seq
    return None if len(a) == len(b) else min(len(a), len(b))


def record_key(record: Record | None) -> tuple | None:
    """What makes two records the same: phase, name, shape, dtype and digest."""
    if record is None:
        return None
    return (record.phase, record.name, record.shape, record.dtype, record.digest)


def first_divergence(
    traces: Sequence[str],
    run_ids: Sequence[int] | None = None,
    partial: bool = False,
    from_step: int = 0,
    latent: bool = False,
    last_step: int | None = None,
    own: bool = False,
) -> Divergence | None:
    """The first divergence among a leg's traces, over the steps they all committed.

    Only observable records count; with ``latent``, the first generator state that differs
    instead (evidence for a cause, or a latent finding). ``partial``: traces may still be
    running or not exist yet (fail-fast polling); the unreadable ones are left out instead
    of raising. ``from_step``: the steps before it are known to agree (fail-fast checks only
    what is new). ``last_step``: look no further than this step. ``own``: the traces are
    the audit's own runs' (see :class:`Trace`); any other trace is read as hostile input.
    """
    run_ids = list(run_ids) if run_ids is not None else list(range(len(traces)))
    opened: list[tuple[int, Trace]] = []
    try:
        for run, path in zip(run_ids, traces):
            try:
                opened.append((run, Trace(path, own=own)))
            except TraceError:
                if not partial:
                    raise
        opened = [(run, t) for run, t in opened if t.steps]
        if len(opened) < 2:
            return None
        last = min(t.last_step for _, t in opened)
        last = last if last_step is None else min(last, last_step)
        reference = opened[0][1]
        mismatches = [
            first_mismatch(reference.path, t.path, last, from_step, latent, own)
            for _, t in opened[1:]
        ]
        found = [m for m in mismatches if m is not None]
        if not found:
            return None
        step, seq = min(found)
        groups: dict[tuple | None, list[int]] = {}
        sides: dict[tuple | None, Record | None] = {}
        for run, trace in opened:
            record = trace.record(step, seq)
            key = record_key(record)
            groups.setdefault(key, []).append(run)
            sides.setdefault(key, record)
        shown = next(r for r in sides.values() if r is not None)
        names = {(r.phase, r.name, r.shape, r.dtype) for r in sides.values() if r is not None}
        kind = "value" if len(names) == 1 and None not in sides else "structure"
        return Divergence(
            step=step,
            seq=seq,
            phase=shown.phase,
            tensor=shown.name,
            shape=shown.shape,
            dtype=shown.dtype,
            runs=list(groups.values()),
            sides=list(sides.values()),
            kind=kind,
        )
    finally:
        for _, trace in opened:
            trace.close()


# ---------------------------------------------------------------- tolerance across legs


@dataclass(frozen=True)
class Tolerance:
    """How close two sketches must be: ``exact``, ``ulp:N`` or ``rtol=..,atol=..``."""

    rtol: float = 0.0
    atol: float = 0.0
    ulps: int | None = None

    @property
    def exact(self) -> bool:
        return self.rtol == 0 and self.atol == 0 and self.ulps is None

    def describe(self) -> str:
        if self.ulps is not None:
            return f"ulp:{self.ulps}"
        return "exact" if self.exact else f"rtol={self.rtol:g},atol={self.atol:g}"

    def limit(self, a: float, b: float, dtype: str) -> float:
        """The largest |a − b| this tolerance allows between two sketch values."""
        scale = max(abs(a), abs(b))
        if self.ulps is not None:
            return self.ulps * _epsilon(dtype) * scale
        return self.atol + self.rtol * scale


# machine epsilon of the floating dtypes every supported torch has (torch.finfo's values):
# a tolerance is checked without importing torch
_EPSILON = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "complex128": 2.0**-52,
    "complex64": 2.0**-23,
}
_INTEGRAL = ("int", "uint", "bool")


def _epsilon(dtype: str) -> float:
    if dtype in _EPSILON:
        return _EPSILON[dtype]
    if dtype.startswith(_INTEGRAL):
        return 1.0  # integer and bool tensors: one unit
    import torch

    try:
        return torch.finfo(getattr(torch, dtype)).eps
    except (TypeError, AttributeError):
        return 1.0


def parse_tolerance(text: str) -> Tolerance:
    """``exact`` | ``ulp:N`` | ``rtol=1e-5,atol=1e-6`` (either key may be left out)."""
    text = text.strip()
    if text == "exact":
        return Tolerance()
    match = re.fullmatch(r"ulp:(\d+)", text)
    if match:
        return Tolerance(ulps=int(match.group(1)))
    values: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("rtol", "atol") or key in values:
            raise ValueError(
                f"tolerance {text!r}: expected exact, ulp:N or rtol=..,atol=.. "
                "(e.g. rtol=1e-5,atol=1e-6)"
            )
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"tolerance {text!r}: {key} must be a number, got {value!r}") from None
        if not math.isfinite(values[key]) or values[key] < 0:
            raise ValueError(f"tolerance {text!r}: {key} must be a finite number ≥ 0")
    return Tolerance(rtol=values.get("rtol", 0.0), atol=values.get("atol", 0.0))


@dataclass
class LegComparison:
    """Two legs (or two traces) compared record by record through their sketches."""

    pair: tuple[str, str]
    tolerance: str
    compared: int = 0
    identical: int = 0  # bitwise-identical records (same hasher on both sides)
    unmeasured: int = 0  # records that differ but have no sketch on one side
    # True / False; None: some records differ and cannot be measured (no sketches), so
    # whether the traces are within the tolerance is unknown — "not comparable"
    within_tolerance: bool | None = True
    first_outside: dict[str, Any] | None = None
    worst: dict[str, Any] | None = None
    growth: list[tuple[int, float]] = field(default_factory=list)  # (step, max rel diff)
    note: str | None = None
    first_differing: dict[str, Any] | None = None  # the first record not bitwise equal
    # that record (the first outside the tolerance, else the first differing) replayed in
    # both legs and diffed on the real tensors: max |Δ|, max ULP, elements differing
    measured: dict[str, Any] | None = None


def compare_sketches(
    path_a: str, path_b: str, tolerance: Tolerance, pair: tuple[str, str], own: bool = False
) -> LegComparison:
    """Compare two traces under a tolerance, from the sketches both recorded (``own``: the
    audit's own runs' traces, see :class:`Trace`)."""
    result = LegComparison(pair=pair, tolerance=tolerance.describe())
    with Trace(path_a, own=own) as a, Trace(path_b, own=own) as b:
        same_hasher = a.run_meta.hasher == b.run_meta.hasher
        last_step = min(a.last_step if a.steps else -1, b.last_step if b.steps else -1)
        shared = sorted(set(a.steps) & set(b.steps))
        # record by record (same place, same phase, name and shape), step by step
        rows = [
            (x.step, x.phase, x.name, x.dtype, x.digest == y.digest, *_sides(x, y))
            for step in shared
            if step <= last_step
            for x, y in zip(a.records(step), b.records(step))
            if (x.phase, x.name, x.shape) == (y.phase, y.name, y.shape) and not x.latent
        ]
    growth: dict[int, float] = {}
    for step, phase, name, dtype, equal, *values in rows:
        result.compared += 1
        bitwise = bool(equal) and same_hasher
        result.identical += bitwise
        side_a, side_b = values[:4], values[4:]
        if bitwise:
            excess = rel = 0.0
        elif side_a[0] is None or side_b[0] is None:
            result.unmeasured += 1  # differs, and no sketch to measure by how much
            continue
        else:
            excess, rel = _sketch_distance(side_a, side_b, tolerance, dtype)
        growth[step] = max(growth.get(step, 0.0), rel)
        where = {
            "step": step,
            "phase": phase,
            "tensor": name,
            "max_rel_diff": rel,
        }
        if not bitwise and result.first_differing is None:
            result.first_differing = where
        if excess > 1.0 and result.first_outside is None:
            result.within_tolerance = False
            result.first_outside = where
        if rel > 0 and (result.worst is None or rel > result.worst["max_rel_diff"]):
            result.worst = where
    result.growth = sorted(growth.items())
    if result.unmeasured:
        if result.within_tolerance:
            result.within_tolerance = None
        result.note = (
            f"not comparable: {result.unmeasured} records differ bitwise and lack the "
            "numeric sketches a tolerance is checked on (traces recorded without sketches; "
            "record them with `reprocheck record`, or audit with more than one leg)"
        )
    return result


def _sides(x: Record, y: Record) -> tuple[Any, ...]:
    """The two records' sketches, side by side: 4 values each, None where not taken."""
    return (*(x.sketch or (None,) * 4), *(y.sketch or (None,) * 4))


def _sketch_distance(
    a: Sequence[float], b: Sequence[float], tolerance: Tolerance, dtype: str
) -> tuple[float, float]:
    """(how many times the tolerance the worst sketch value is off, its relative difference)."""
    if a[3] != b[3]:  # NaN/Inf counts differ: never within tolerance
        return math.inf, math.inf
    excess = rel = 0.0
    for x, y in zip(a[:3], b[:3]):
        gap = abs(x - y)
        if gap == 0:
            continue
        allowed = tolerance.limit(x, y, dtype)
        excess = max(excess, gap / allowed if allowed > 0 else math.inf)
        rel = max(rel, gap / max(abs(x), abs(y)))
    return excess, rel


# ---------------------------------------------------------------- numeric diff of two tensors


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to integers that are ordered like the floats (for ULP distance)."""
    import torch

    width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    bits = t.contiguous().view(width).to(torch.int64)
    sign_bit = 1 << (8 * t.element_size() - 1)
    magnitude = bits & (sign_bit - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def numeric_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """max |Δ|, max relative Δ, max ULP distance, how many elements differ, the first one."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return {
            "comparable": False,
            "why": f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}",
        }
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.dtype == torch.bool:
        a, b = a.to(torch.uint8), b.to(torch.uint8)
    # Bits, not values: -0.0 vs 0.0 and different NaN payloads count as differences.
    differ = _ordered_bits(a) != _ordered_bits(b) if a.is_floating_point() else a != b
    count = int(differ.sum())
    out: dict[str, Any] = {
        "elements_differing": count,
        "elements": a.numel(),
        "fraction_differing": count / a.numel() if a.numel() else 0.0,
        "max_abs_diff": 0.0,
        "max_rel_diff": 0.0,
        "max_ulp": 0,
        "first_index": None,
    }
    if count == 0:
        return out
    first = int(differ.reshape(-1).nonzero()[0])
    out["first_index"] = list(torch.unravel_index(torch.tensor(first), a.shape)) if a.dim() else []
    out["first_index"] = [int(i) for i in out["first_index"]]
    x, y = a.double(), b.double()
    gap = (x - y).abs()
    finite = torch.isfinite(gap)
    if finite.any():
        out["max_abs_diff"] = float(gap[finite].max())
        scale = torch.maximum(x.abs(), y.abs())[finite]
        rel = gap[finite] / scale.clamp_min(torch.finfo(torch.float64).tiny)
        out["max_rel_diff"] = float(rel.max())
    if not bool(finite.all()):
        out["nonfinite_differing"] = int((~finite & differ).sum())
    if a.is_floating_point():
        out["max_ulp"] = int((_ordered_bits(a) - _ordered_bits(b)).abs().max())
    else:
        out["max_ulp"] = int(gap.max()) if bool(finite.all()) else None
    return out


# ---------------------------------------------------------------- as report values

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
    "replay_error",
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
    "ops_window",
    "made_by",
    "rung",
    "ladder",
    "compiled_output",
)


def divergence_dict(
    divergence: Divergence,
    *,
    diff: Mapping[str, Any] | None = None,
    zoom: Mapping[str, Any] | None = None,
    variability: Sequence[Mapping[str, Any]] = (),
    generator: Mapping[str, Any] | None = None,
    seeding: str | None = None,
) -> dict[str, Any]:
    """``first_divergence`` as the JSON report has it, with what the later stages found:
    the replay's numeric ``diff``, the ``zoom``'s op, the ``variability`` at the step and
    the ``generator`` whose state differed before it."""
    diff, zoom = diff or {}, zoom or {}
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
        out[key] = zoom.get(key)
    out["variability"] = [dict(item) for item in variability]
    out["generator"] = dict(generator) if generator else None
    out["seeding"] = seeding
    if generator and not out["cause"]:  # no zoom said otherwise
        g = generator
        out["cause"] = Cause.RNG
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
        "first_differing": comparison.first_differing,
        "measured": comparison.measured,
    }
