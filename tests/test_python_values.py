"""Causes from every argument of an op, not only its tensors: a Python number that differs
between runs is named with both values and its line, never called a nondeterministic op."""

from __future__ import annotations

import re

from .conftest import SCRIPTS, run_exec, script_line


def test_a_python_float_drawn_from_entropy_is_named_with_both_values(tmp_path):
    result = run_exec(tmp_path / "out", tmp_path / "r.json", (str(SCRIPTS / "entropy_scale.py"),))
    d = result.report["first_divergence"]
    assert (result.code, d["step"], d["phase"], d["tensor"]) == (1, 1, "outputs", "output")
    assert (d["module"], d["op"], d["stage"]) == ("Block", "aten.mul", "forward")
    assert d["source"].endswith(script_line("entropy_scale.py", "* self.scale").split("/")[-1])
    assert d["cause"] == "a Python value differs"
    values = re.findall(r"1\.0000\d+", d["cause_detail"])
    assert len(values) == 2 and values[0] != values[1]
    assert "its tensor inputs are identical" in d["cause_detail"]


def test_the_fixed_scale_reproduces(tmp_path):
    result = run_exec(
        tmp_path / "out", tmp_path / "r.json", (str(SCRIPTS / "entropy_scale.py"), "--fixed-scale")
    )
    assert (result.code, result.report["verdict"]) == (0, "reproducible")
