"""Golden traces: record, check unchanged / changed / in another environment, JUnit,
GitHub annotations, and the pytest plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reprocheck.trace import Trace

from .conftest import CONFIGS, ROOT, run_cli


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("golden")
    path = folder / "demo.sqlite"
    result = run_cli(
        "record",
        str(CONFIGS / "demo.yaml"),
        "-o",
        str(path),
        "--steps",
        "6",
        "--out",
        str(folder / "out"),
        "-q",
    )
    assert result.code == 0, result.stderr
    return path


def _config_with_lr(tmp_path: Path, lr: str) -> Path:
    text = (CONFIGS / "demo.yaml").read_text().replace("lr: 0.1,", f"lr: {lr},")
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def test_golden_is_small_and_marked(golden):
    with Trace(golden) as trace:
        assert "golden" in trace.meta
        assert trace.steps == list(range(7))
        assert trace.has_sketches
        records = trace.record_count()
    assert os.path.getsize(golden) < 60 * records + 40_000


def test_check_unchanged_is_exit_0(golden, tmp_path):
    result = run_cli(
        "check",
        str(CONFIGS / "demo.yaml"),
        "--against",
        str(golden),
        "--steps",
        "6",
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert result.code == 0, result.stderr
    assert "✔ MATCHES GOLDEN" in result.stdout
    g = result.report["golden"]
    assert (g["mode"], g["matches"], g["environment_differs"]) == ("bitwise", True, {})


def test_changed_learning_rate_names_step_1_and_the_first_weight(golden, tmp_path):
    config = _config_with_lr(tmp_path, "0.05")
    junit = tmp_path / "junit.xml"
    result = run_cli(
        "check",
        str(config),
        "--against",
        str(golden),
        "--steps",
        "6",
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(tmp_path / "r.json"),
        "--junit",
        str(junit),
    )
    assert result.code == 1, result.stderr
    d = result.report["golden"]["first_divergence"]
    # grads at step 1 do not depend on the learning rate: the update does
    assert (d["step"], d["phase"], d["tensor"]) == (1, "weights", "layers.0.weight")
    assert d["sketch_rel_diff"] > 0
    assert "✘ CHANGED against golden at step 1 · weights · layers.0.weight" in result.stdout
    # the change against the golden is what decides the verdict: the report's divergence
    top = result.report["first_divergence"]
    assert (top["compared"], top["step"], top["phase"], top["tensor"]) == (
        "golden",
        1,
        "weights",
        "layers.0.weight",
    )
    assert result.report["verdict"] == "diverged" and result.report["exit_code"] == 1
    assert "across legs" not in result.stdout
    assert result.stdout.count("CHANGED against golden") == 1

    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == str(
        len(suite.findall("testcase"))
    )
    failures = [
        (case.get("name"), case.find("failure"))
        for case in suite.findall("testcase")
        if case.find("failure") is not None
    ]
    assert len(failures) == 1
    name, failure = failures[0]
    assert name == "golden[demo.sqlite]"
    assert failure.get("message") == failure.text
    assert "step 1 · weights · layers.0.weight" in failure.text


def test_other_thread_count_is_compared_under_tolerance(golden, tmp_path):
    result = run_cli(
        "check",
        str(CONFIGS / "demo.yaml"),
        "--against",
        str(golden),
        "--steps",
        "6",
        "--threads",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert result.code == 0, result.stderr
    g = result.report["golden"]
    assert g["mode"] == "tolerance"
    assert g["environment_differs"] == {"threads": [1, 2]}
    assert g["comparison"]["tolerance"] == "rtol=1e-05,atol=1e-06"
    assert (
        "environment differs (threads 1 → 2): compared under rtol=1e-05,atol=1e-06" in result.stdout
    )


def test_github_annotations(golden, tmp_path):
    config = _config_with_lr(tmp_path, "0.2")
    result = run_cli(
        "check",
        str(config),
        "--against",
        str(golden),
        "--steps",
        "6",
        "--out",
        str(tmp_path / "out"),
        "--format",
        "github",
    )
    assert result.code == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("::")]
    assert lines == [
        f"::error file={config},title=golden[demo.sqlite]::changed against golden: "
        "diverged at step 1 · weights · layers.0.weight"
    ]


def test_bad_golden_is_refused_before_running(tmp_path, golden):
    run_trace = next((golden.parent / "out").glob("*/cpu-t1-r0.sqlite"))
    result = run_cli(
        "check",
        str(CONFIGS / "demo.yaml"),
        "--against",
        str(run_trace),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.code == 2
    assert "is a run's trace, not a golden trace" in result.stderr
    assert not (tmp_path / "out").exists()
    missing = run_cli("check", str(CONFIGS / "demo.yaml"), "--against", str(tmp_path / "no.sqlite"))
    assert missing.code == 2 and "no such trace file" in missing.stderr


def test_golden_of_another_config_is_refused(golden, tmp_path):
    result = run_cli(
        "check",
        str(CONFIGS / "planted-forward.yaml"),
        "--against",
        str(golden),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "-q",
    )
    assert result.code == 2
    assert "is the golden trace of config 'demo', not 'planted-forward'" in result.stderr


@pytest.mark.slow
def test_record_refuses_a_divergent_config(tmp_path):
    result = run_cli(
        "record",
        str(CONFIGS / "planted-init.yaml"),
        "-o",
        str(tmp_path / "g.sqlite"),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "1",
    )
    assert result.code == 1
    assert "no golden trace written" in result.stdout
    assert not (tmp_path / "g.sqlite").exists()


PLUGIN_TEST = """
from reprocheck.pytest_plugin import assert_reproducible


def test_demo_reproduces(reprocheck_audit):
    report = reprocheck_audit({demo!r}, steps=2)
    assert report["verdict"] == "reproducible"


def test_planted_noise_is_named():
    assert_reproducible({forward!r}, steps=3, out={out!r})
"""


def test_pytest_plugin(tmp_path):
    test_file = tmp_path / "test_user.py"
    test_file.write_text(
        PLUGIN_TEST.format(
            demo=str(CONFIGS / "demo.yaml"),
            forward=str(CONFIGS / "planted-forward.yaml"),
            out=str(tmp_path / "out"),
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test_file),
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert (
        "AssertionError: planted-forward: diverged at step 3 · outputs · output "
        "(op aten.randn at reprocheck/zoo/planted.py"
    ) in proc.stdout or "diverged at step 3 · outputs · output (op aten.randn at" in proc.stdout
