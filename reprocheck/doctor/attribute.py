"""Attribution: which control makes a divergent config reproduce?

Each candidate control is switched on alone (and, where none alone answers, all together),
the config rerun up to the divergent step with two runs, and the verdicts read off. The
first control alone that makes the runs agree is the cause's fix; where none does, the
zoom's cause (an entropy-seeded generator, a nondeterministic op) is named instead.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..contract import Target
from ..trace import Trace, TraceError
from . import rules
from .probe import Auditor

Change = Callable[[Config], Config]


def _determinism(**values: Any) -> Change:
    return lambda c: dataclasses.replace(
        c, determinism=dataclasses.replace(c.determinism, **values)
    )


CANDIDATES: tuple[tuple[str, str, Change], ...] = (
    (
        "every seed (random, NumPy, torch)",
        "RC003",
        _determinism(seed_python=True, seed_numpy=True, seed_torch=True),
    ),
    ("PYTHONHASHSEED fixed", "RC004", _determinism(pythonhashseed=0)),
    ("a seeded DataLoader generator", "RC008", _determinism(dataloader_generator=True)),
    # deterministic algorithms alone: the filling of uninitialized memory they bring
    # (torch ≥ 2.1) is the next control, so that a read of it is told from an op
    (
        "deterministic algorithms",
        "RC011",
        _determinism(deterministic_algorithms=True, fill_uninitialized_memory=False),
    ),
    (
        "uninitialized memory filled (NaN)",
        "RC020",
        _determinism(deterministic_algorithms="warn", fill_uninitialized_memory=True),
    ),
    (
        "cuDNN deterministic, no benchmark",
        "RC005",
        _determinism(cudnn_benchmark=False, cudnn_deterministic=True),
    ),
    ("CUBLAS_WORKSPACE_CONFIG=:4096:8", "RC007", _determinism(cublas_workspace=":4096:8")),
    ("one thread", "RC010", lambda c: dataclasses.replace(c, threads=(1,))),
    (
        "num_workers=0",
        "RC009",
        lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, num_workers=0)),
    ),
    # a compiled leg: the same training eager (a script's torch.compile returns its model)
    ("compile off", "RC025", lambda c: dataclasses.replace(c, compile=(False,))),
)


def attribute(
    auditor: Auditor,
    config: Config,
    leg_device: str,
    leg_threads: int | None,
    step: int,
    folder: Path,
    zoom: dict[str, Any] | None = None,
    jobs: int | None = None,
    leg_compile: bool | None = None,
    leg_env: tuple[tuple[str, str], ...] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(findings, the table of every control tried with its verdict), each control's
    variant audited through ``auditor``: the divergent leg alone (its device, threads,
    compile setting and environment) with the control on."""

    base = dataclasses.replace(
        config,
        steps=max(step, 1),
        repeats=2,
        devices=(leg_device,),
        threads=(leg_threads,),
        compile=(leg_compile,),
        environments=(leg_env,),
    )
    cuda = leg_device.startswith("cuda")
    tried: list[dict[str, Any]] = []

    changes = []
    for label, code, change in CANDIDATES:
        if code in ("RC005", "RC007") and not cuda:
            continue
        if code == "RC025" and not leg_compile:
            continue  # an eager leg: nothing to turn off
        if code in ("RC011", "RC020") and base.determinism.deterministic_algorithms:
            continue  # already on, with the memory filled as the preset has it
        variant = change(base)
        if variant == base:
            continue  # already on: nothing to learn
        changes.append((label, code, change))
    variants = [(label, code, change(base)) for label, code, change in changes]
    together = base
    for _, _, change in changes:
        together = change(together)
    # the controls' reruns side by side (`--jobs` runs at once; default: as many as the
    # cores hold): each is an audit of two runs that run in parallel themselves. Two runs
    # settle a control: forks of one zygote draw one address order 0.2–0.5% of the time
    # on tests/scripts/set_init.py, fresh interpreters of one hash seed 0.6–1.0% (measured:
    # benchmarks/bench_address_order.py), so a third run would not make a fork's "agree"
    # worth more than a fresh pair's.
    workers = max(1, (jobs or os.cpu_count() or 1) // 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def audit_all(batch: list[tuple[str, str | None, Config]], first: int) -> None:
            futures = [
                pool.submit(auditor.audit, variant, folder / f"control-{first + index}")
                for index, (_, _, variant) in enumerate(batch)
            ]
            for (label, code, _), future in zip(batch, futures):
                report = future.result()
                item = {"control": label, "code": code, "verdict": report["verdict"]}
                by = overridden(code, auditor.target, report)
                if by is not None:  # the script undid the control: its runs say nothing of it
                    item.update(verdict="overridden", overridden_by=by)
                tried.append(item)

        audit_all(variants, 0)
        # all of them together only answers where no control alone did
        alone = any(t["verdict"] == "reproducible" for t in tried)
        if len(changes) > 1 and not alone:
            audit_all([("all of them together", None, together)], len(variants))

    fixes = [t for t in tried if t["verdict"] == "reproducible" and t["code"]]
    if any(t["code"] == "RC011" for t in fixes):  # deterministic kernels alone suffice
        fixes = [t for t in fixes if t["code"] != "RC020"]
    if fixes:
        return [
            rules.BY_CODE[t["code"]].fire("control", {"tried": tried}, control=t["control"])
            for t in fixes
        ], tried
    if tried and tried[-1]["verdict"] == "reproducible":
        return [rules.RC003.fire("all controls", {"tried": tried})], tried
    return rules.for_cause(zoom, tried), tried


def _in_effect(report: dict[str, Any]) -> dict[str, Any]:
    """What the first run's script left in effect (``meta.effective``), its own calls
    that set a control (``meta.overrides``) and its seeding calls."""
    for leg in report.get("legs") or []:
        for run in leg.get("runs") or []:
            try:
                with Trace(run["trace"], own=True) as trace:
                    meta = trace.run_meta
            except (TraceError, KeyError, TypeError):
                continue
            return {
                "effective": meta.effective or {},
                "overrides": meta.overrides or [],
                "seeding": meta.seeding or [],
            }
    return {"effective": {}, "overrides": [], "seeding": []}


def _call(calls: list[dict[str, Any]], name: str) -> str:
    last = next((c for c in reversed(calls) if c["call"] == name), None)
    if last is None:
        return f"the script's own `{name}`"
    return f"`{name}({last['value']})` at {last['where']}"


def overridden(code: str | None, target: Target, report: dict[str, Any]) -> str | None:
    """The script's own call that undid a control in the variant's run (its
    ``torch.set_num_threads``, its own seeding …), or None if the control held. A thread
    count or deterministic-algorithms setting the script changed is read from what was in
    effect at its first step: its runs then say nothing of the control, even where two of
    them happened to agree.

    Only a script (``reprocheck exec``) sets controls of its own; a config's recipe never
    does, so for configs this is always None."""
    if not target.is_script or code is None:
        return None
    seen = _in_effect(report)
    effective, calls = seen["effective"], seen["overrides"]
    if code == "RC010" and effective.get("threads") not in (None, 1):
        return _call(calls, "torch.set_num_threads")
    if code in ("RC011", "RC020") and effective.get("deterministic_algorithms") is False:
        return _call(calls, "torch.use_deterministic_algorithms")
    if code == "RC005" and (
        effective.get("cudnn_benchmark") or effective.get("cudnn_deterministic") is False
    ):
        return "the script's own cuDNN flags"
    # the script's own seeding undoes the control only where the runs still differ (a
    # script that seeds torch alone is fixed by a control that seeds NumPy too)
    if code == "RC003" and seen["seeding"] and report.get("verdict") != "reproducible":
        first = seen["seeding"][0]
        value = "" if first["value"] == "entropy" else first["value"]
        return f"`{first['call']}({value})` at {first['where']}"
    return None
