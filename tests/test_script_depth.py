"""Scripts get the depth of configs: attribution, doctor, golden checks, and the rules
that read what a script does (an evaluation in training mode, a read of uninitialized
memory, package versions that moved since a golden was recorded).

Every case is a real run of a script in tests/scripts/ through the CLI; each distinct
command runs once per module and is shared by the tests that read it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from .conftest import ROOT, SCRIPTS, CliResult, ScriptAudits, run_cli, run_exec, script_line
from .strict_json import load_strict


class Runs:
    """Each distinct CLI command once per module: ``exec`` audits and ``doctor`` runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[tuple[str, ...], CliResult] = {}
        self.audits = ScriptAudits(folder / "exec")

    def exec(self, script: str, *args: str, options: tuple[str, ...] = ()) -> CliResult:
        return self.audits(script, *args, options=options)  # each command once, there

    def doctor(self, script: str, *args: str) -> tuple[CliResult, dict]:
        key = ("doctor", script, *args)
        if key not in self.done:
            index = len(self.done)
            report = self.folder / f"d{index}.json"
            self.done[key] = run_cli(
                "doctor", "-q", "--out", str(self.folder / f"out{index}"), "--json", str(report),
                "--", "python", str(SCRIPTS / script), *args,
            )  # fmt: skip
        result = self.done[key]
        return result, load_strict(self.folder / f"d{list(self.done).index(key)}.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("depth"))


# -- attribution ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_set_ordered_vocabulary_is_attributed_to_pythonhashseed(tmp_path, monkeypatch):
    # --preset none leaves PYTHONHASHSEED as the environment has it: unset here
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    result = run_exec(
        tmp_path / "out",
        tmp_path / "r.json",
        (str(SCRIPTS / "char_vocab.py"),),
        ("--preset", "none", "--attribute", "--no-measure"),
    )
    assert result.code == 1, result.report
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "outputs", "output")
    # NumPy's and random's generators differ too (entropy), but nothing draws from them
    assert first["generator"] is None and first["seeding"] is None
    tried = {item["control"]: item for item in result.report["attribution"]}
    assert tried["PYTHONHASHSEED fixed"]["verdict"] == "reproducible"
    assert tried["one thread"]["verdict"] == "diverged"
    # the script seeds torch itself; the control's own seeding changes nothing there
    assert tried["every seed (random, NumPy, torch)"] == {
        "control": "every seed (random, NumPy, torch)",
        "code": "RC003",
        "verdict": "overridden",
        "overridden_by": "`torch.manual_seed(1337)` at "
        + script_line("char_vocab.py", "manual_seed(1337)"),
    }
    assert [f["code"] for f in result.report["findings"]] == ["RC004"]


@pytest.mark.slow
def test_the_sorted_vocabulary_reproduces_without_a_hash_seed(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    result = run_exec(
        tmp_path / "out",
        tmp_path / "r.json",
        (str(SCRIPTS / "char_vocab.py"), "--sorted"),
        ("--preset", "none", "--attribute"),
    )
    assert result.code == 0, result.report
    assert result.report["attribution"] == []
    # NumPy's and random's generators start from entropy and differ, unused: a warning
    assert [f["code"] for f in result.report["findings"]] == ["RC018"]


# -- doctor -- python ----------------------------------------------------------------------


# slow: the doctor's probes keep a default test each (tests/test_doctor.py, the RC020 case above)
@pytest.mark.slow
def test_doctor_names_each_cuda_nondeterministic_op_of_a_script_with_itsscript_line(runs):
    result, found = runs.doctor("segment_pool.py")
    assert result.code == 1, result.stderr
    assert found["command"] == ["python", str(SCRIPTS / "segment_pool.py")]
    risky = {f["evidence"]["op"]: f for f in found["findings"] if f["code"] == "RC006"}
    assert risky["aten.index_add"]["evidence"]["source"] == script_line(
        "segment_pool.py", "index_add_(0, labels"
    )
    bilinear = risky["aten.upsample_bilinear2d_backward"]["evidence"]
    assert bilinear["source"] == script_line("segment_pool.py", "features = F.interpolate(")
    assert bilinear["stage"] == "backward"
    # bincount is nondeterministic on CUDA only with weights; this one has none
    assert "aten.bincount" not in risky
    # it writes every element it reads: no uninitialized memory reaches a record
    assert "RC020" not in {f["code"] for f in found["findings"]}


def test_doctor_finds_a_read_of_uninitialized_memory(runs):
    result, found = runs.doctor("uninit_buffer.py")
    assert result.code == 1, result.stderr
    by_code = {f["code"]: f for f in found["findings"]}
    assert set(by_code) == {"RC020"}  # the other probes' runs do not repeat: no verdict
    assert by_code["RC020"]["evidence"]["step"] == 1


# slow: the doctor's probes keep a default test each (tests/test_doctor.py, the RC020 case above)
@pytest.mark.slow
def test_doctor_on_the_fixed_script_finds_no_uninitialized_read(runs):
    result, found = runs.doctor("uninit_buffer.py", "--zeros")
    assert result.code in (0, 1), result.stderr
    assert "RC020" not in {f["code"] for f in found["findings"]}, found


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--", "no-such-launcher", "x.sh"), "no such command: no-such-launcher"),
        (("--", "python", "missing.py"), "no such script: missing.py"),
        (("configs/demo.yaml", "--", "python", "x.py"), "unexpected arguments"),
        ((), "give a config or a script"),
    ],
)
def test_doctor_record_and_check_usage_errors_are_onescript_line(args, needle, tmp_path):
    for command in (("doctor",), ("record", "-o", str(tmp_path / "g.sqlite"))):
        text = needle.replace("doctor", command[0])
        result = run_cli(*command, "-q", *args)
        assert result.code == 2, (command, result.stderr)
        assert text in result.stderr and result.stderr.count("\n") == 1, result.stderr


# -- golden checks of a script -------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(tmp_path_factory, segment_pool_golden) -> Path:
    """`record -- python segment_pool.py --lr 0.05` (the session's, tests/conftest.py), in a
    folder of this module's own."""
    folder = tmp_path_factory.mktemp("golden")
    return Path(shutil.copy(segment_pool_golden, folder / "golden.sqlite"))


def _check(golden: Path, *args: str) -> CliResult:
    folder = golden.parent
    report = folder / f"c{len(list(folder.glob('c*.json')))}.json"
    return run_cli(
        "check", "-q", "--against", str(golden), "--out", str(folder / "out"),
        "--json", str(report), "--", "python", str(SCRIPTS / "segment_pool.py"), *args,
    )  # fmt: skip


def test_a_script_unchanged_matches_its_golden(golden):
    result = _check(golden, "--lr", "0.05")
    assert result.code == 0, result.report
    assert result.report["golden"]["matches"] is True
    assert result.report["golden"]["changes"] == {}
    assert result.report["golden"]["packages_differ"] == {}
    assert "RC021" not in {f["code"] for f in result.report["findings"]}


def test_a_changed_argument_fails_the_check_at_step_1_weights(golden):
    result = _check(golden, "--lr", "0.1")
    assert result.code == 1
    first = result.report["first_divergence"]
    assert (first["compared"], first["step"], first["phase"]) == ("golden", 1, "weights")
    assert result.report["golden"]["changes"] == {"arguments": [["--lr", "0.05"], ["--lr", "0.1"]]}


def test_a_check_names_the_packages_whose_versions_moved(golden, tmp_path):
    # the golden as another machine would have recorded it: an older NumPy
    moved = tmp_path / "golden.sqlite"
    shutil.copy(golden, moved)
    db = sqlite3.connect(moved)
    with db:
        (text,) = db.execute("SELECT value FROM meta WHERE key = 'packages'").fetchone()
        packages = json.loads(text)
        current = packages["numpy"]
        packages["numpy"] = "1.26.4"
        db.execute("UPDATE meta SET value = ? WHERE key = 'packages'", (json.dumps(packages),))
    db.close()
    result = _check(moved, "--lr", "0.05")
    assert result.code == 0, result.report  # a warning: the numerics still match
    assert result.report["golden"]["packages_differ"] == {"numpy": ["1.26.4", current]}
    drift = [f for f in result.report["findings"] if f["code"] == "RC021"]
    assert len(drift) == 1 and f"numpy 1.26.4 → {current}" in drift[0]["message"]
    assert drift[0]["severity"] == "warning"


def test_a_script_golden_is_not_a_configs(golden):
    result = run_cli(
        "check", "-q", "--against", str(golden), "--out", str(golden.parent / "out"),
        str(ROOT / "configs" / "demo.yaml"),
    )  # fmt: skip
    assert result.code == 2
    assert "golden trace of config 'segment_pool'" in result.stderr
    assert result.stderr.count("\n") == 1


# -- an evaluation in training mode (RC019) ------------------------------------------------


def test_an_evaluation_forward_in_training_mode_is_a_warning(runs):
    result = runs.exec("manual_update.py", "--dropout", "0.2", "--eval-in-train-mode")
    assert result.code == 0, result.report  # it reproduces: the finding warns, it fails nothing
    (found,) = result.report["findings"]
    assert found["code"] == "RC019" and found["severity"] == "warning"
    assert found["evidence"]["where"] == script_line(
        "manual_update.py", "output, hidden = model(data"
    )
    assert found["evidence"]["layers"] == ["drop (Dropout)"]
    assert found["evidence"]["step"] == 12


def test_an_evaluation_after_model_eval_is_no_finding(runs):
    result = runs.exec("manual_update.py", "--dropout", "0.2")
    assert result.code == 0, result.report
    assert result.report["findings"] == []
