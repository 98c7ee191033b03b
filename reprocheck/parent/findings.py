"""The findings an audit reports beside its verdict: the rules its traces and the script
hooks' observations fire, and the attribution of a divergence to a control."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compare import (
    Divergence,
)
from ..config import Config
from ..doctor import rules
from ..trace import Trace, TraceError
from .launch import Leg, RunResult
from .stages import Evidence, Latent, Measurement

if TYPE_CHECKING:
    pass
from .divergence import generator_section

if TYPE_CHECKING:
    from .audit import AuditOptions


def observed_findings(legs: list[Leg]) -> list[dict[str, Any]]:
    """What a run's processes noted for a rule while they ran, read from the first run of
    each leg, each of its traces opened once: an evaluation forward with dropout or batch
    norm in training mode (RC019, ``meta.observations``), a compiled model's dropout drawing
    from inductor's generator (RC028), and the script's torch.compile calls (RC026, RC027,
    RC029: see :func:`compile_findings`); once per model and line. A process notes an
    observation by its rule's name (it imports no catalog)."""
    found: dict[tuple[str, str | None], dict[str, Any]] = {}
    for leg in legs:
        for run in leg.runs[:1]:
            for process, path in run.processes.items():
                try:
                    with Trace(path, own=True) as trace:
                        meta = trace.run_meta
                except TraceError:
                    continue
                for seen in meta.observations or []:
                    key = (seen["model"], seen["where"])
                    rule = rules.BY_NAME.get(seen.get("rule"))
                    if key in found or rule is None or "observed" not in rule.ways:
                        continue
                    facts = {k: v for k, v in seen.items() if k != "rule"}
                    evidence = {"code": rule.code, **facts, "process": process}
                    found[key] = rule.fire("observed", evidence, **facts, process=process)
                compile_findings(meta, path, found)
    return list(found.values())


def shared_files(legs: list[Leg]) -> list[dict[str, Any]]:
    """RC031: files that two runs of a leg both opened for writing at one path (each
    process's ``meta.written``): the runs shared a working directory."""

    def written(run: RunResult) -> set[str]:
        paths: set[str] = set()
        for path in run.processes.values():
            try:
                with Trace(path, own=True) as trace:
                    paths.update(p for p in trace.run_meta.written or [] if isinstance(p, str))
            except TraceError:
                continue
        return paths

    for leg in legs:
        runs = [run for run in leg.runs if run.status != "pending"]
        if len(runs) < 2:
            continue
        sets = [written(run) for run in runs]
        shared = sorted(set.intersection(*sets) if all(sets) else set())
        if not shared:
            continue
        evidence = {"paths": shared[:50], "count": len(shared)}
        return [rules.RC031.fire("shared files", evidence, paths=shared)]
    return []


def compile_findings(meta: dict[str, Any], path: str, found: dict[tuple, dict]) -> None:
    """Into ``found``: a trace's torch.compile calls whose mode or options autotune
    (RC026) or record CUDA graphs (RC027), from ``meta.compile_options``, once per line;
    graphs dynamo made after the first step (RC029, ``meta.dynamo_graphs``)."""
    graphs = meta.dynamo_graphs or {}
    first, end = graphs.get("step1"), graphs.get("end")
    recompiled = rules.RC029.fires("recompiles", first=first, end=end)
    if recompiled and (rules.RC029.code, path) not in found:
        found[(rules.RC029.code, path)] = rules.RC029.fire(
            "recompiles", graphs, first=first, end=end
        )
    for call in meta.compile_options or []:
        asked = [call.get("mode") or ""]
        asked += [f"{k}={v}" for k, v in (call.get("options") or {}).items()]
        text = " ".join(asked).strip()
        for rule in rules.RULES:
            key = (rule.code, call["where"])
            if rule.fires("compile call", text=text) and key not in found:
                found[key] = rule.fire("compile call", call, where=call["where"], text=text)


def drift_finding(packages: dict[str, list[str]]) -> dict[str, Any]:
    return rules.RC021.fire("drift", {"packages": packages}, packages=packages)


def latent_finding(found: Latent) -> dict[str, Any]:
    latent, names = found.divergence, list(found.generators)
    return rules.RC018.fire(
        "latent",
        {**generator_section(latent), "generators": names},
        generators=names,
        runs=latent.runs,
        step=latent.step,
        process=latent.process,
    )


def audit_findings(
    config: Config,
    options: AuditOptions,
    leg: Leg,
    first: Divergence,
    evidence: Evidence,
    measurement: Measurement,
    folder: Path,
    timings: dict[str, float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """The cause and fix: by attribution (rerunning with each control), else from the zoom
    or the generator that differed."""
    zoom = measurement.zoom
    from ..doctor.attribute import attribute
    from .audit import Auditor, _jobs  # (which runs audits: imported when one is made)

    if options.attribute:
        started = time.monotonic()
        try:
            found, tried = attribute(
                Auditor(options.target, any_threads=True),
                config,
                leg.device,
                leg.threads,
                first.step,
                folder / "attribution",
                zoom,
                jobs=_jobs(config, options),
                leg_compile=leg.compile,
                leg_env=leg.env,
            )
        except KeyboardInterrupt:
            return [], [], True
        timings["attribution_s"] = time.monotonic() - started
        return found, tried, False
    g = evidence.generator
    if rules.RC015.fires("generator", generator=g, cause=zoom.get("cause")):
        found = rules.RC015.fire(
            "generator",
            {**g, "seeding": evidence.seeding},
            generator=g,
            seeding=evidence.seeding,
            where=zoom.get("source"),
            step=first.step,
            call=evidence.seeding_call,  # the fix names the script's own call and line
        )
        return [found], [], False
    return rules.for_cause(zoom), [], False
