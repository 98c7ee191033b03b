"""Attribution: which control makes a divergent config reproduce?

Each candidate control is switched on alone (and then all together), the config rerun
up to the divergent step with two runs, and the verdicts read off. The first control
alone that makes the runs agree is the cause's fix; where none does, the zoom's cause
(an entropy-seeded generator, a nondeterministic op) is named instead.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from .probe import Auditor, finding

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
    ("deterministic algorithms", "RC011", _determinism(deterministic_algorithms=True)),
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
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(findings, the table of every control tried with its verdict), each control's
    variant audited through ``auditor``."""

    base = dataclasses.replace(
        config, steps=max(step, 1), repeats=2, devices=(leg_device,), threads=(leg_threads,)
    )
    cuda = leg_device.startswith("cuda")
    tried: list[dict[str, Any]] = []

    changes = []
    for label, code, change in CANDIDATES:
        if code in ("RC005", "RC007") and not cuda:
            continue
        variant = change(base)
        if variant == base:
            continue  # already on: nothing to learn
        changes.append((label, code, change))
    variants = [(label, code, change(base)) for label, code, change in changes]
    if len(changes) > 1:
        together = base
        for _, _, change in changes:
            together = change(together)
        variants.append(("all of them together", None, together))
    # the controls' reruns side by side, as many as the cores hold: each is an audit of
    # two runs that run in parallel themselves
    workers = jobs or max(1, (os.cpu_count() or 1) // 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = [
            pool.submit(auditor.audit, variant, folder / f"control-{index}")
            for index, (_, _, variant) in enumerate(variants)
        ]
        for (label, code, _), report in zip(variants, verdicts):
            tried.append({"control": label, "code": code, "verdict": report.result()["verdict"]})

    fixes = [t for t in tried if t["verdict"] == "reproducible" and t["code"]]
    if fixes:
        return [
            finding(
                t["code"], f"with {t['control']} the runs reproduce ({t['code']})", {"tried": tried}
            )
            for t in fixes
        ], tried
    if tried and tried[-1]["verdict"] == "reproducible":
        return [
            finding(
                "RC003", "only all the controls together make the runs reproduce", {"tried": tried}
            )
        ], tried
    cause = (zoom or {}).get("cause")
    where = (zoom or {}).get("source")
    if cause == "unseeded or re-seeded RNG":
        return [
            finding(
                "RC015",
                f"no control makes the runs reproduce: a generator seeded "
                f"outside the configured seed draws at {where}",
                {"tried": tried},
            )
        ], tried
    if cause == "nondeterministic op":
        return [
            finding(
                "RC011",
                f"no control makes the runs reproduce: {zoom.get('op')} at "
                f"{where} is nondeterministic",
                {"tried": tried},
            )
        ], tried
    return [], tried
