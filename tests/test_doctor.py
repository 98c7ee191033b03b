"""The doctor: each rule fires where it should and stays quiet where it should not."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import pytest

from reprocheck.configfile import load_config
from reprocheck.doctor.probe import static_findings
from reprocheck.doctor.rules import RULES, find, markdown
from reprocheck.zoo import doctor_fixtures

from .conftest import CONFIGS, ROOT, run_cli
from .strict_json import load_strict


def _line(function, needle: str) -> str:
    lines, start = inspect.getsourcelines(function)
    path = os.path.relpath(inspect.getsourcefile(function))
    return f"{path}:{start + next(i for i, text in enumerate(lines) if needle in text)}"


def _codes(findings) -> list[str]:
    return [f["code"] for f in findings]


DEMO = load_config(CONFIGS / "demo.yaml")


def _with(**determinism):
    return dataclasses.replace(
        DEMO, determinism=dataclasses.replace(DEMO.determinism, **determinism)
    )


@pytest.mark.parametrize(
    ("code", "config"),
    [
        ("RC001", _with(seed_python=False)),
        ("RC002", _with(seed_numpy=False)),
        ("RC003", _with(seed_torch=False)),
        ("RC005", _with(cudnn_benchmark=True)),
        ("RC007", dataclasses.replace(_with(deterministic_algorithms=True), devices=("cuda",))),
        ("RC008", _with(dataloader_generator=False)),
    ],
)
def test_static_rule_fires(code, config, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert _codes(static_findings(config)) == [code]


def test_static_rules_quiet_on_the_default_preset(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert static_findings(DEMO) == []
    # cuBLAS configured: RC007 stays quiet
    strict = dataclasses.replace(
        DEMO,
        devices=("cuda",),
        determinism=dataclasses.replace(
            DEMO.determinism, deterministic_algorithms=True, cublas_workspace=":4096:8"
        ),
    )
    assert static_findings(strict) == []


def test_explain_every_rule_and_unknown_codes():
    for rule in RULES:
        text = rule.explain()
        assert text.startswith(f"{rule.code} {rule.name}\n")
        for part in ("## What it does", "## Why is this bad?", "## Example", "## Use instead"):
            assert part in text
    result = run_cli("explain", "rc004")  # the command prints the same text, any case
    assert result.code == 0
    assert result.stdout == find("RC004").explain() + "\n"
    unknown = run_cli("explain", "RC04")
    assert unknown.code == 2
    assert unknown.stderr.strip() == "reprocheck: error: unknown rule 'RC04' — did you mean RC004?"


def test_rules_doc_is_generated_from_the_catalog():
    assert (ROOT / "docs" / "rules.md").read_text() == markdown()
    assert len({rule.code for rule in RULES}) == len(RULES)


def test_gpu_risk_prescan_names_each_op_with_its_line(tmp_path):
    result = run_cli(
        "doctor", str(CONFIGS / "doctor-gpu-risk.yaml"), "--out", str(tmp_path), "--json", "-"
    )
    assert result.code == 1, result.stderr
    findings = load_strict(result.stdout)["findings"]
    risky = {f["evidence"]["op"]: f["evidence"]["source"] for f in findings if f["code"] == "RC006"}
    forward = doctor_fixtures.GpuRisky.forward
    assert risky == {
        "aten.index_add": _line(forward, "index_add("),
        "aten.upsample_bilinear2d_backward": _line(forward, "F.interpolate"),
    }
    # the conv's backward sums differently with 2 threads: a real sensitivity
    assert "RC010" in _codes(findings)
    assert "RC017" not in _codes(findings)
    # the page beside the probes' traces: the findings with their lines, as text
    page = Path(load_strict(result.stdout)["html"]).read_text()
    assert 'id="verdict">FINDINGS</span>' in page and "<b>RC006</b>" in page
    assert "exit 1" in page and _line(forward, "index_add(") in page


def test_workers_with_numpy_augmentation_reproduce_without_false_findings(audit, tmp_path):
    result = audit("doctor-workers.yaml", "--attribute")
    assert result.code == 0, result.stderr
    assert result.report["verdict"] == "reproducible"
    assert result.report["findings"] == []
    doctor = run_cli(
        "doctor", str(CONFIGS / "doctor-workers.yaml"), "--out", str(tmp_path), "--json", "-"
    )
    assert doctor.code == 1, doctor.stderr
    codes = _codes(load_strict(doctor.stdout)["findings"])
    # workers are seeded by torch: no RC008/RC002; no thread or hash-seed sensitivity
    assert not {"RC002", "RC004", "RC008", "RC010"} & set(codes)
    # the noise does change with the worker count (0 workers draw in the main process)
    assert codes == ["RC009"]


def test_hash_seed_dependence_is_attributed_to_pythonhashseed(audit, tmp_path):
    result = audit("doctor-hashseed.yaml", "--attribute", env={"PYTHONHASHSEED": ""})
    assert result.code == 1, result.stderr
    d = result.report["first_divergence"]
    assert (d["step"], d["phase"], d["tensor"], d["cause"]) == (1, "data", "input", "data pipeline")
    assert _codes(result.report["findings"]) == ["RC004"]
    assert (
        result.report["findings"][0]["message"]
        == "with PYTHONHASHSEED fixed the runs reproduce (RC004)"
    )
    tried = {t["control"]: t["verdict"] for t in result.report["attribution"]}
    assert tried["PYTHONHASHSEED fixed"] == "reproducible"
    assert tried["deterministic algorithms"] == "diverged"
    fixed = Path(tmp_path / "fixed.yaml")
    fixed.write_text(
        (CONFIGS / "doctor-hashseed.yaml")
        .read_text()
        .replace(
            "determinism: {preset: seeded, pythonhashseed: null}", "determinism: {preset: seeded}"
        )
    )
    assert audit(fixed).code == 0


@pytest.mark.slow
def test_hash_seed_probe_in_doctor(tmp_path):
    result = run_cli(
        "doctor", str(CONFIGS / "doctor-hashseed.yaml"), "--out", str(tmp_path), "--json", "-"
    )
    findings = load_strict(result.stdout)["findings"]
    hashed = [f for f in findings if f["code"] == "RC004"]
    assert len(hashed) == 1
    assert hashed[0]["evidence"] == {"step": 1, "phase": "data", "tensor": "input"}


def test_entropy_generator_and_nondeterministic_op_findings_from_the_zoom(audit):
    forward = audit("planted-forward.yaml")
    assert _codes(forward.report["findings"]) == ["RC015"]
    assert "reprocheck/zoo/planted.py:" in forward.report["findings"][0]["message"]
    demo = audit("demo.yaml")  # the session's demo audit (tests/test_audit.py)
    assert demo.report["findings"] == []


@pytest.mark.slow
def test_attribution_of_the_real_nondeterministic_op(audit):
    result = audit("nondeterministic-index.yaml", "--attribute")
    assert result.code == 1
    codes = _codes(result.report["findings"])
    assert "RC011" in codes and "RC010" in codes  # deterministic algorithms, or one thread


@pytest.mark.slow
def test_torch_compile_is_flagged(tmp_path):
    result = run_cli(
        "doctor",
        str(CONFIGS / "doctor-compile.yaml"),
        "--out",
        str(tmp_path),
        "--json",
        "-",
        timeout=1200,
    )
    findings = load_strict(result.stdout)["findings"]
    assert "RC017" in _codes(findings), findings


@pytest.mark.parametrize(
    ("crash_step", "steps", "probe"),
    [(1, "2", "op scan"), (3, "4", "threads")],
)
def test_a_probe_whose_run_fails_is_an_error_not_a_clean_bill(tmp_path, crash_step, steps, probe):
    """A probe that ran nothing found nothing: doctor says which probe failed, why and
    where its log is, in one line, and exits 3 — never '✔ no findings'."""
    config = tmp_path / "crash.yaml"
    config.write_text(
        (CONFIGS / "planted-crash.yaml").read_text().replace("{step: 3}", f"{{step: {crash_step}}}")
    )
    result = run_cli("doctor", str(config), "--out", str(tmp_path / "out"), "--steps", steps)
    assert result.code == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("reprocheck:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"reprocheck: error: probe '{probe}': ")
    assert f"RuntimeError: planted crash at step {crash_step}" in lines[0]
    assert "(log: " in lines[0] and "no findings" not in result.stdout
