"""What an audit leaves in its folder: traces, logs, specs and report.json — no SQLite
side files (`-wal`, `-shm`), no step logs (`-steps`); and how its report reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from reprocheck.compare import first_divergence
from reprocheck.configfile import apply_overrides, load_config
from reprocheck.parent.audit import AuditOptions, run_audit
from reprocheck.report.json import write_report
from reprocheck.report.terminal import render
from reprocheck.trace import Trace, committed_steps

from .conftest import CONFIGS
from .strict_json import load_strict

SIDE_FILES = ("-wal", "-shm", "-journal", "-steps")


def _audit(config: str, out: Path, jobs: int | None = None, **overrides) -> dict:
    """The audit as `reprocheck run -q --no-attribute` does it, in this process."""
    config = apply_overrides(load_config(CONFIGS / config), **overrides)
    report = run_audit(config, AuditOptions(out=str(out), attribute=False, jobs=jobs))
    write_report(report, Path(report["out_dir"]) / "report.json")
    return report


def _side_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(SIDE_FILES))


@pytest.fixture(scope="module")
def two_legs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("two-legs")
    return _audit("demo.yaml", out, jobs=2, steps=3, devices=["cpu"], threads=[1, 2])


def test_an_audit_leaves_no_sqlite_side_files_or_step_logs(two_legs):
    folder = Path(two_legs["out_dir"])
    assert two_legs["verdict"] == "reproducible", two_legs["legs"]
    traces = sorted(folder.glob("*.sqlite"))
    assert [t.name for t in traces] == [f"cpu-t{t}-r{r}.sqlite" for t in (1, 2) for r in (0, 1)]
    assert (folder / "report.json").exists()
    assert _side_files(folder) == []


def test_reading_the_traces_afterwards_leaves_no_side_files(two_legs):
    folder = Path(two_legs["out_dir"])
    traces = [str(p) for p in sorted(folder.glob("cpu-t1-*.sqlite"))]
    for path in traces:
        with Trace(path) as trace:  # read-only, as `show` and the report read them
            assert trace.status == "complete" and trace.record_count() > 0
        assert committed_steps(path) == 4
    assert first_divergence(traces) is None  # both attached read-only in one connection
    assert _side_files(folder) == []


def test_a_killed_run_leaves_no_side_files(tmp_path):
    report = _audit("planted-killed.yaml", tmp_path)
    assert report["exit_code"] == 3
    statuses = [run["status"] for leg in report["legs"] for run in leg["runs"]]
    assert "killed" in statuses, report["legs"]
    folder = Path(report["out_dir"])
    for path in folder.glob("*.sqlite"):
        with Trace(path) as trace:
            trace.record_count()
    assert _side_files(folder) == []


def test_the_report_is_strict_json(two_legs):
    data = load_strict(Path(two_legs["out_dir"]) / "report.json")
    assert data["verdict"] == "reproducible" and len(data["across_legs"]) == 1


def test_the_terminal_view_of_a_two_leg_audit(two_legs):
    console = Console(width=100, record=True, highlight=False, soft_wrap=True)
    render(two_legs, console)
    lines = console.export_text().splitlines()
    assert lines[0].endswith(" · threads 1,2"), lines[0]
    assert lines[1].startswith("config  demo (seed 0, 2 runs × 3 steps, preset seeded)")
    summary = next(line for line in lines if line.startswith("✔ REPRODUCIBLE"))
    records = sum(leg["records"] for leg in two_legs["legs"])
    assert summary == (
        f"✔ REPRODUCIBLE  4 runs × 4 steps × 7 phases · {records:,} digests bitwise identical"
    )
    at = next(i for i, line in enumerate(lines) if line.startswith("  across legs"))
    assert lines[at].rstrip() == "  across legs under rtol=1e-05,atol=1e-06"
    head, row = lines[at + 1], lines[at + 2]
    assert head.split() == ["legs", "verdict", "identical", "worst", "rel", "Δ", "outside", "from"]
    assert row.startswith("  cpu-t1 vs cpu-t2  within ") and head.startswith("  legs ")
    assert all(len(line) <= 100 for line in lines[at:])
    assert lines[at + 3].startswith("  time ")
