"""pytest plugin: assert in a few lines that a config trains reproducibly.

Installed with reprocheck (entry point ``pytest11``)::

    def test_training_is_reproducible(reprocheck_audit):
        report = reprocheck_audit("configs/model.yaml", steps=5)
        assert report["verdict"] == "reproducible", report["first_divergence"]

    def test_with_one_call():
        from reprocheck.pytest_plugin import assert_reproducible
        assert_reproducible("configs/model.yaml", steps=5)
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

from .options import DEFAULT_OUT, LegOptions, audit_setup


def audit_config(
    config: str | os.PathLike,
    *,
    out: str | os.PathLike = DEFAULT_OUT,
    repeats: int | None = None,
    steps: int | None = None,
    devices: list[str] | None = None,
    threads: list[int] | None = None,
    zoom: bool = True,
    attribute: bool = False,
) -> dict[str, Any]:
    """Audit a config (each run in its own process) and return the JSON report as a dict."""
    from .configfile import load_config
    from .parent.audit import run_audit

    legs = LegOptions(
        repeats=repeats,
        steps=steps,
        devices=None if devices is None else tuple(devices),
        threads=None if threads is None else tuple(threads),
        out=os.fspath(out),
    )
    loaded, options = audit_setup(load_config(config), legs, zoom=zoom, attribute=attribute)
    return run_audit(loaded, options)


def summary(report: dict[str, Any]) -> str:
    """One line: the verdict and, if any, where the runs first differ or fail."""
    d = report.get("first_divergence")
    if d:
        where = f"step {d['step']} · {d['phase']} · {d['tensor']}"
        extra = f" (op {d['op']} at {d['source']}: {d['cause']})" if d.get("op") else ""
        return f"{report['config']['name']}: diverged at {where}{extra}"
    failed = [
        run
        for leg in report["legs"]
        for run in leg["runs"]
        if run["status"] not in ("complete", "stopped")
    ]
    if failed:
        return f"{report['config']['name']}: run failed: {failed[0]['error']}"
    return f"{report['config']['name']}: {report['verdict']}"


def assert_reproducible(config: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Audit a config; raise AssertionError naming the first divergence unless it reproduces."""
    report = audit_config(config, **overrides)
    if report["verdict"] != "reproducible":
        raise AssertionError(summary(report))
    return report


@pytest.fixture
def reprocheck_audit(tmp_path) -> Callable[..., dict[str, Any]]:
    """``reprocheck_audit(config, **overrides)`` → the report; traces under ``tmp_path``."""

    def _audit(config: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
        overrides.setdefault("out", tmp_path / "reprocheck")
        return audit_config(config, **overrides)

    return _audit
