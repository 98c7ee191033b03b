"""Failure modes: bad traces, killed and interrupted runs, unwritable output, concurrent
audits, hostile names. Each ends in a clear answer and a documented exit code."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reprocheck.trace import Trace

from .conftest import CONFIGS, ROOT, run_cli, write_config
from .strict_json import load_strict


@pytest.fixture
def traces(audit) -> dict[str, Path]:
    """Real traces: two runs of planted-backward, one of demo, and a killed run — of the
    audits the session shares (tests/test_audit.py and the killed run's test below read
    them too; the tests here only read the traces, or copy them). Each run ran to its end:
    planted-backward's without fail-fast, demo's and planted-killed's with no divergence
    to stop them."""
    found: dict[str, Path] = {}
    for config, extra in (
        ("planted-backward.yaml", ("--no-fail-fast", "--no-measure")),
        ("demo.yaml", ()),
        ("planted-killed.yaml", ()),
    ):
        runs = audit(config, *extra).report["legs"][0]["runs"]
        stem = config.removesuffix(".yaml")
        found[f"{stem}-0"], found[f"{stem}-1"] = Path(runs[0]["trace"]), Path(runs[1]["trace"])
    return found


def _corrupt(source: Path, target: Path, how: str) -> Path:
    data = source.read_bytes()
    if how == "truncated":
        target.write_bytes(data[: len(data) // 3])
    elif how == "header-only":
        target.write_bytes(data[:100])
    elif how == "zeroed-middle":
        middle = len(data) // 2
        target.write_bytes(data[:middle] + bytes(4096) + data[middle + 4096 :])
    elif how == "garbage-pages":
        target.write_bytes(data[:4096] + os.urandom(len(data) - 4096))
    return target


def _sqlite(path: Path, *statements: str) -> Path:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return path


def _copy_with(source: Path, target: Path, *statements: str) -> Path:
    shutil.copy(source, target)
    return _sqlite(target, *statements)


BAD_TRACES = {
    "missing": (lambda t, d: d / "nope.sqlite", "no such trace file"),
    "folder": (lambda t, d: d, "is a folder"),
    "empty": (lambda t, d: _write(d / "e.sqlite", b""), "not a SQLite file"),
    "text": (lambda t, d: _write(d / "t.sqlite", b"step,digest\n1,abc\n"), "not a SQLite file"),
    "png": (
        lambda t, d: _write(d / "p.sqlite", b"\x89PNG\r\n\x1a\n" + bytes(200)),
        "not a SQLite file",
    ),
    "random": (lambda t, d: _write(d / "r.sqlite", os.urandom(8192)), "not a SQLite file"),
    "sqlite-header-zeros": (
        lambda t, d: _write(d / "z.sqlite", b"SQLite format 3\x00" + bytes(4000)),
        "not a reprocheck trace",
    ),
    "foreign-sqlite": (
        lambda t, d: _sqlite(d / "f.sqlite", "CREATE TABLE people (name TEXT)"),
        "not a reprocheck trace",
    ),
    "foreign-meta": (
        lambda t, d: _sqlite(
            d / "m.sqlite",
            "CREATE TABLE meta (key TEXT, value TEXT)",
            "INSERT INTO meta VALUES ('schema', '\"other/1\"')",
        ),
        "not a reprocheck trace",
    ),
    "meta-not-json": (
        lambda t, d: _copy_with(
            t["demo-0"], d / "j.sqlite", "UPDATE meta SET value = '{oops' WHERE key = 'status'"
        ),
        "corrupted trace metadata",
    ),
    "wrong-version": (
        lambda t, d: _copy_with(
            t["demo-0"], d / "v.sqlite", "UPDATE meta SET value = '99' WHERE key = 'schema_version'"
        ),
        "trace schema version 99",
    ),
    "no-records-table": (
        lambda t, d: _copy_with(t["demo-0"], d / "n.sqlite", "DROP TABLE records"),
        "corrupted trace",
    ),
    "no-steps-table": (
        lambda t, d: _copy_with(t["demo-0"], d / "s.sqlite", "DROP TABLE steps"),
        "corrupted trace",
    ),
    "truncated": (lambda t, d: _corrupt(t["demo-0"], d / "tr.sqlite", "truncated"), "trace"),
    "header-only": (lambda t, d: _corrupt(t["demo-0"], d / "h.sqlite", "header-only"), "trace"),
    "zeroed-middle": (
        lambda t, d: _corrupt(t["demo-0"], d / "zm.sqlite", "zeroed-middle"),
        "trace",
    ),
    "garbage-pages": (lambda t, d: _corrupt(t["demo-0"], d / "g.sqlite", "garbage-pages"), "trace"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_TRACES))
def test_bad_trace_is_exit_2_one_line(traces, tmp_path, case):
    make, needle = BAD_TRACES[case]
    bad = make(traces, tmp_path)
    for args in ((str(bad), str(traces["demo-0"])), (str(traces["demo-0"]), str(bad))):
        result = run_cli("compare", *args)
        if result.code == 1 and case in ("zeroed-middle", "garbage-pages"):
            # damage that SQLite could not see: the digests then disagree instead
            continue
        assert result.code == 2, (case, result.stdout, result.stderr)
        assert result.stderr.startswith("reprocheck: error: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert needle in result.stderr


def test_trace_of_a_different_config_is_refused(traces):
    result = run_cli("compare", str(traces["demo-0"]), str(traces["planted-backward-0"]))
    assert result.code == 2
    assert result.stderr.strip() == (
        "reprocheck: error: the traces come from different configs ('demo' vs 'planted-backward'): "
        "pass --any-config to compare them anyway"
    )


def test_trace_that_ended_early_says_where(traces):
    result = run_cli("compare", str(traces["planted-killed-0"]), str(traces["planted-killed-1"]))
    assert result.code == 0, result.stderr
    assert "steps 0–2 — ended early (failed: killed by SIGKILL at step 3)" in result.stdout


@pytest.mark.parametrize(
    "tolerance", ["loose", "rtol=abc", "ulp:x", "rtol=-1", "atol=1,atol=2", "rtol=inf"]
)
def test_bad_tolerance_is_exit_2(traces, tolerance):
    result = run_cli(
        "compare", str(traces["demo-0"]), str(traces["demo-1"]), "--tolerance", tolerance
    )
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and "tolerance" in result.stderr


def test_killed_run_keeps_earlier_steps_and_report_says_where(audit):
    result = audit("planted-killed.yaml")
    assert result.code == 3
    assert result.report["verdict"] == "failed"
    for run in result.report["legs"][0]["runs"]:
        assert (run["status"], run["steps"]) == ("killed", 2)
        assert run["error"] == "killed by SIGKILL at step 3"
        with Trace(run["trace"]) as trace:
            assert trace.steps == [0, 1, 2]
            assert trace.status == "failed"


def _wait_for_steps(folder: Path, count: int, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        traces = sorted(p for p in folder.glob("*/*.sqlite"))
        ready = []
        for path in traces:
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
                ready.append(db.execute("SELECT count(*) FROM steps").fetchone()[0] >= count)
                db.close()
            except sqlite3.Error:
                ready.append(False)
        if len(ready) == 2 and all(ready):
            return traces
        time.sleep(0.2)
    raise AssertionError(f"runs did not reach step {count - 1} in {timeout} s")


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_interrupt_stops_every_run_and_writes_a_partial_report(tmp_path, signum):
    report_path = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a shell's background job (CI's may be one) starts with SIGINT ignored, and a child
    # inherits that: while it starts, this process handles SIGINT, so the child's Python
    # installs its own handler
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reprocheck",
            "run",
            str(CONFIGS / "planted-hang.yaml"),
            "-q",
            "--out",
            str(tmp_path / "out"),
            "--json",
            str(report_path),
            "--jobs",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    signal.signal(signal.SIGINT, ignored)
    traces = _wait_for_steps(tmp_path / "out", 2)  # both runs hang inside step 2
    parent.send_signal(signum)
    parent.communicate(timeout=60)
    assert parent.returncode == 130
    report = load_strict(report_path)
    assert report["verdict"] == "failed" and report["interrupted"] is True
    for run in report["legs"][0]["runs"]:
        assert run["status"] == "interrupted"
        assert run["error"] == "interrupted (Ctrl-C) at step 2"
    for path in traces:
        with Trace(path) as trace:
            assert trace.steps == [0, 1]
            assert trace.status == "failed"
            pid = trace.meta["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no run is left behind


def test_unwritable_out_is_exit_2_before_any_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("run", str(CONFIGS / "demo.yaml"), "--out", str(blocker / "sub"), "-q")
    assert result.code == 2
    assert result.stderr == (
        f"reprocheck: error: --out: not a folder: {blocker} (for {blocker / 'sub'})\n"
    )
    assert result.stderr.count("\n") == 1
    assert not list(tmp_path.glob("**/*.sqlite"))


def test_two_audits_into_one_out_never_clobber(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reprocheck",
                "run",
                str(CONFIGS / "demo.yaml"),
                "-q",
                "--steps",
                "3",
                "--out",
                str(tmp_path / "out"),
                "--json",
                str(tmp_path / f"r{i}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    reports = [load_strict(tmp_path / f"r{i}.json") for i in range(2)]
    folders = {report["out_dir"] for report in reports}
    assert len(folders) == 2
    for folder in folders:
        assert len(list(Path(folder).glob("*.sqlite"))) == 2
        assert load_strict(Path(folder) / "report.json")["verdict"] == "reproducible"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("run", "configs/nope.yaml"), "no such config file"),
        (("run", "configs/demo.yaml", "--threads", "two"), "--threads takes whole numbers"),
        (("run", "configs/demo.yaml", "-n", "0"), "-n: 0 is out of range"),
        (("run", "configs/demo.yaml", "--device", "tpu"), "unknown device 'tpu'"),
        (("run", "configs/demo.yaml", "--steps", "-1"), "out of range"),
    ],
)
def test_usage_errors_are_one_line(args, needle):
    result = run_cli(*args)
    assert result.code == 2
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


HOSTILE_MODEL = """
import os
import torch


class Hostile(torch.nn.Module):
    def __init__(self):
        super().__init__()
        entropy = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        weight = torch.nn.Parameter(torch.randn(32, 4, generator=entropy))
        self.register_parameter("[bold red]boom[/bold red]<script>", weight)

    def forward(self, x):
        return x @ getattr(self, "[bold red]boom[/bold red]<script>")


def build():
    return Hostile()
"""


def test_hostile_names_are_shown_literally(tmp_path):
    (tmp_path / "hostile.py").write_text(HOSTILE_MODEL)
    config = write_config(
        tmp_path,
        """
name: "[blink]hostile[/blink]"
steps: 2
model: hostile.py:build
data: reprocheck.zoo.data:classification
""",
    )
    result = run_cli(
        "run", str(config), "--out", str(tmp_path / "out"), "--no-measure", "--no-attribute"
    )
    assert result.code == 1, result.stderr
    assert "✘ DIVERGED at step 0 · weights · [bold red]boom[/bold red]<script>" in result.stdout
    assert "[blink]hostile[/blink]" in result.stdout


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_audit(tmp_path):
    """1000 steps of a model with 500 parameter tensors: child RSS flat after warm-up."""
    (tmp_path / "wide.py").write_text("""
import torch


def build():
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(250)])
""")
    config = write_config(
        tmp_path,
        """
name: wide
steps: 1000
repeats: 1
threads: [1]
model: wide.py:build
data: {factory: reprocheck.zoo.data:classification, kwargs: {features: 8}, batch_size: 8}
loss: mse_loss
step: wide.py:step
""",
    )
    (tmp_path / "wide.py").write_text(
        (tmp_path / "wide.py").read_text()
        + """

def step(model, batch, optimizer):
    x, _ = batch
    loss = (model(x) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
"""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reprocheck",
            "run",
            str(config),
            "--out",
            str(tmp_path / "out"),
            "-q",
            "--json",
            str(tmp_path / "r.json"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    parent_rss = []  # the parent polls the trace all along: its memory must not grow either
    while parent.poll() is None:
        with open(f"/proc/{parent.pid}/status") as status:
            line = next((x for x in status if x.startswith("VmRSS:")), None)
        if line:
            parent_rss.append(int(line.split()[1]) / 1024)
        time.sleep(1)
    assert parent.returncode == 0, parent.stderr.read()
    report = load_strict(tmp_path / "r.json")
    with Trace(report["legs"][0]["runs"][0]["trace"]) as trace:
        rss = trace.meta["rss_mib"]
    settled = parent_rss[len(parent_rss) // 4 :]
    assert max(settled) - min(settled) < 20, parent_rss
    warm, end = rss["100"], rss["1000"]
    assert end - warm < 20, rss
