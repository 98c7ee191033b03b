"""A training script given where a config goes: one line naming `reprocheck exec`, exit 2."""

from __future__ import annotations

import pytest

from .conftest import ROOT, run_cli

SCRIPT = "examples/noisy_train.py"  # a real training script: as YAML, a syntax error
LINE = (
    f"reprocheck: error: {SCRIPT} is a Python script, not a config: "
    f"audit it with `reprocheck exec -- python {SCRIPT}`"
)

COMMANDS = {
    "run": ("run", SCRIPT),
    "doctor": ("doctor", SCRIPT),
    "record": ("record", SCRIPT, "-o", "{tmp}/golden.sqlite"),
    # the config is read before the golden: a missing golden is not what is said
    "check": ("check", SCRIPT, "--against", "{tmp}/no-such-golden.sqlite"),
}


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["loud", "quiet"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_python_script_as_config_is_one_line_and_exit_2(command, quiet, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in COMMANDS[command]]
    result = run_cli(*args, *quiet, "--out", str(tmp_path / "out"), cwd=ROOT, timeout=120)
    assert result.code == 2, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [LINE], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert sorted(tmp_path.iterdir()) == []  # refused before any folder, run or golden


def test_a_script_named_without_py_is_known_by_its_shebang(tmp_path):
    script = tmp_path / "train"
    script.write_text("#!/usr/bin/env python3\nimport torch\nprint(torch.ones(2))\n")
    result = run_cli("run", str(script), "-q", "--out", str(tmp_path / "out"))
    assert result.code == 2
    assert result.stderr.splitlines() == [
        f"reprocheck: error: {script} is a Python script, not a config: "
        f"audit it with `reprocheck exec -- python {script}`"
    ]


def test_a_missing_script_is_still_no_such_file(tmp_path):
    result = run_cli("run", str(tmp_path / "train.py"), "-q")
    assert result.code == 2
    assert result.stderr.splitlines() == [
        f"reprocheck: error: {tmp_path / 'train.py'}: no such config file"
    ]
