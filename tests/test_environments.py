"""Environment legs: the same audit in another environment (``--env KEY=VALUE``,
``environments:`` in a config), compared with the default leg under the tolerance.

On this machine ``ATEN_CPU_CAPABILITY=default`` swaps torch's vectorized CPU kernels for the
portable ones: a Linear-GELU-LayerNorm-Linear's output sum moves from -7.3179474 to
-7.3179398 (checked before this test was written), and the initial weights drawn by
``uniform_``/``normal_`` already differ in their last bits."""

from __future__ import annotations

import pytest

from .conftest import CONFIGS, SCRIPTS, run_cli, write_config

ENV = "ATEN_CPU_CAPABILITY=default"


def test_a_cpu_capability_leg_differs_from_the_default_one_from_step_0(audit):
    result = audit("demo.yaml", "--env", ENV, "--steps", "3")
    report = result.report
    default, other = [leg for leg in report["legs"] if leg["status"] != "skipped"]
    assert (default["name"], default["env"]) == ("cpu-t1", {})
    assert (other["name"], other["env"]) == ("cpu-t1-e1", {"ATEN_CPU_CAPABILITY": "default"})
    (across,) = report["across_legs"]
    assert across["pair"] == ["cpu-t1", "cpu-t1-e1"]
    first = across["first_differing"]
    assert (first["step"], first["phase"], first["tensor"]) == (0, "weights", "layers.0.weight")
    assert 0 < first["max_rel_diff"] < 1e-5  # the last bits of the initial weights
    # replayed in both legs and diffed on the real tensors: by how much
    measured = across["measured"]
    assert (measured["step"], measured["tensor"]) == (0, "layers.0.weight")
    assert 0 < measured["elements_differing"] <= measured["elements"]
    assert 0 < measured["max_abs_diff"] < 1e-6 and measured["max_ulp"] > 0
    assert across["identical"] < across["compared"]
    # within the config's tolerance: the verdict stands, the difference is in the report
    assert (across["within_tolerance"], report["verdict"], result.code) == (
        True,
        "reproducible",
        0,
    )
    # each leg's runs are still compared bit for bit among themselves
    assert report["first_divergence"] is None


def test_a_tight_tolerance_names_the_first_step_and_tensor_outside_it(audit, tmp_path):
    config = write_config(
        tmp_path,
        (CONFIGS / "demo.yaml").read_text()
        + "\ntolerance: {across_legs: {rtol: 0.0, atol: 0.0}}\n"
        + "environments: [{}, {ATEN_CPU_CAPABILITY: default}]\n",
    )
    result = audit(config, "--steps", "2")
    (across,) = result.report["across_legs"]
    assert across["within_tolerance"] is False
    outside = across["first_outside"]
    assert (outside["step"], outside["phase"], outside["tensor"]) == (
        0,
        "weights",
        "layers.0.weight",
    )
    assert (result.report["verdict"], result.code) == ("diverged", 1)


def test_a_script_gets_environment_legs_too(tmp_path):
    result = run_cli(
        "exec", "-q", "--no-attribute", "--env", ENV, "--out", str(tmp_path),
        "--json", str(tmp_path / "r.json"), "--", "python", str(SCRIPTS / "segment_pool.py"),
    )  # fmt: skip
    report = result.report
    legs = [leg for leg in report["legs"] if leg["status"] != "skipped"]
    assert [leg["env"] for leg in legs] == [{}, {"ATEN_CPU_CAPABILITY": "default"}]
    (across,) = report["across_legs"]
    assert across["first_differing"] is not None and across["first_differing"]["step"] == 0
    environment = run_cli("show", legs[1]["runs"][0]["trace"]).stdout
    assert "DEFAULT" in environment  # the leg's traces say which kernels ran


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("environments: {A: 1}", "expected a list of mappings"),
        ("environments: [{}, {1BAD: x}]", "'1BAD' is not an environment variable name"),
        ("environments: [{}, {A: [1]}]", "expected a string or number"),
        ("environments: [{}, {}]", "an environment is listed twice"),
    ],
)
def test_bad_environments_are_config_errors(tmp_path, text, message):
    config = write_config(tmp_path, (CONFIGS / "demo.yaml").read_text() + "\n" + text + "\n")
    result = run_cli("run", str(config), "-q", "--out", str(tmp_path))
    assert result.code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_env_takes_key_value(tmp_path):
    result = run_cli("run", str(CONFIGS / "demo.yaml"), "-q", "--env", "NOEQUALS")
    assert result.code == 2 and "--env takes KEY=VALUE (got 'NOEQUALS')" in result.stderr


def test_another_interpreter_runs_a_leg_of_its_own(tmp_path):
    """`--python PATH`: one more leg whose runs that interpreter starts (never forked from
    this one's warm pool), with its versions in the report; here this venv's own
    interpreter, so the leg must agree with the default one bit for bit."""
    import sys

    result = run_cli(
        "run", str(CONFIGS / "demo.yaml"), "--python", sys.executable, "--steps", "2", "-q",
        "--no-attribute", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    legs = [leg for leg in result.report["legs"] if leg["status"] != "skipped"]
    assert [leg["env"] for leg in legs] == [{}, {"REPROCHECK_PYTHON": sys.executable}]
    assert legs[0]["versions"] == legs[1]["versions"] and legs[1]["versions"]["torch"]
    assert not any(run["forked"] for run in legs[1]["runs"])
    (across,) = result.report["across_legs"]
    assert across["identical"] == across["compared"] > 0


def test_an_interpreter_without_torch_fails_its_leg_with_the_reason(tmp_path):
    """A link to the venv's python outside the venv is the base interpreter: no torch."""
    import os
    import sys

    link = tmp_path / "python-link"
    os.symlink(sys.executable, link)
    result = run_cli(
        "run", str(CONFIGS / "demo.yaml"), "--python", str(link), "--steps", "2", "-q",
        "--no-attribute", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert result.code == 3
    failed = [r for leg in result.report["legs"] if leg["env"] for r in leg["runs"]]
    assert failed and all("No module named 'torch'" in (r["error"] or "") for r in failed)


def test_python_must_name_an_interpreter(tmp_path):
    result = run_cli("run", str(CONFIGS / "demo.yaml"), "-q", "--python", "/no/such/python")
    assert result.code == 2 and "--python /no/such/python: no such interpreter" in result.stderr


@pytest.mark.slow
def test_a_second_venv_with_another_numpy_is_a_leg_with_its_versions(tmp_path):
    """A real second environment: a venv with torch 2.13.0 and NumPy 2.2.6 (pip from the
    local index; skipped, with the reason, where it cannot be built)."""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    built = subprocess.run(
        f"{base} -m venv {venv} && {venv}/bin/pip install -q --disable-pip-version-check "
        "torch==2.13.0 numpy==2.2.6 xxhash pyyaml",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.skip(f"no second venv here: {built.stderr.strip().splitlines()[-1:]}")
    result = run_cli(
        "run", str(CONFIGS / "demo.yaml"), "--python", str(venv / "bin" / "python"),
        "--steps", "3", "-q", "--no-attribute", "--out", str(tmp_path / "out"),
        "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    legs = [leg for leg in result.report["legs"] if leg["status"] != "skipped"]
    assert legs[1]["versions"]["numpy"] == "2.2.6" != legs[0]["versions"]["numpy"]
    assert result.report["across_legs"][0]["within_tolerance"] is True
