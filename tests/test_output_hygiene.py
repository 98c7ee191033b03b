"""Untrusted input ends cleanly: names and messages from a script or a trace are shown
escaped and cut (terminal, annotations, JUnit, HTML, JSON), and a command-line mistake (an
output path that cannot be written, a number out of its range) is one line, exit 2, before
any run starts."""

from __future__ import annotations

import inspect
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from reprocheck.report.github import annotations
from reprocheck.report.html import render_html
from reprocheck.report.junit import write_junit
from reprocheck.report.safe import DATA_LIMIT, TEXT_LIMIT, clean, cut, cut_all, safe
from reprocheck.report.terminal import render

from .conftest import CONFIGS, run_cli
from .test_architecture import _cli_in_a_fresh_interpreter

HOSTILE = "x\x1b[2J\x1b]0;pwned\x07\x01"  # clear the screen, set the title, a C0 char
SHOWN = "x\\x1b[2J\\x1b]0;pwned\\x07\\x01"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what may never reach a screen or a file
HUGE = 2**20  # a 1 MiB error message

DIVERGES = inspect.cleandoc(f"""
    import os
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    KEY = {HOSTILE!r}
    rows = [
        {{"x": torch.ones(4), KEY: torch.tensor(list(os.urandom(4)), dtype=torch.float32)}}
        for _ in range(8)
    ]
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in DataLoader(rows, batch_size=4):
        loss = model(batch["x"]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
""")

FAILS = inspect.cleandoc(f"""
    import torch
    from torch import nn

    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        if step == 1:
            raise RuntimeError("\\x1b[2J boom \\x01 " + "A" * {HUGE})
        loss = model(torch.ones(2, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
""")


def _exec(tmp_path: Path, name: str, source: str, *options: str):
    script = tmp_path / name
    script.write_text(source)
    report = tmp_path / f"{name}.json"
    result = run_cli(
        "exec", "--steps", "2", "--out", str(tmp_path / "out"), "--json", str(report),
        "--no-measure", "--no-zoom", "--no-attribute", *options, "--", "python", str(script),
    )  # fmt: skip
    assert result.report is not None, result.stderr
    return result


def _terminal(report: dict) -> str:
    console = Console(width=120, record=True, highlight=False, soft_wrap=True)
    render(report, console)
    return console.export_text()


def test_the_sanitizer_escapes_controls_and_cuts_with_the_length():
    assert safe(HOSTILE) == SHOWN
    assert (
        safe("a\nb\tc\r\x7f\x9b\u202e\udc80\uffff") == "a\\nb\\tc\\r\\x7f\\x9b\\u202e\\udc80\\uffff"
    )
    assert safe("a\nb\tc", newlines=True) == "a\nb\tc"
    assert safe("ok é 中 · ✔") == "ok é 中 · ✔"
    big = "A" * (64 * 2**20)
    shown = safe(big)
    assert shown == "A" * TEXT_LIMIT + "… (67,108,864 characters)"
    kept = cut(big)
    assert len(kept) <= DATA_LIMIT and kept.endswith("… (67,108,864 characters)")
    assert cut(kept) == kept  # cut once, left as it is
    assert safe(kept).endswith("… (67,108,864 characters)")  # the length it was cut from
    assert clean({HOSTILE: [HOSTILE, (1, None)]}) == {SHOWN: [SHOWN, (1, None)]}
    assert cut_all({"k": [big], "n": 1.5}) == {"k": [kept], "n": 1.5}


def test_a_hostile_tensor_name_is_shown_escaped_everywhere(tmp_path):
    result = _exec(tmp_path, "names.py", DIVERGES)
    assert result.code == 1, result.stderr
    report = result.report
    d = report["first_divergence"]
    assert d["phase"] == "data" and d["tensor"] == HOSTILE  # the JSON keeps the data
    for text in (result.stdout, result.stderr, _terminal(report)):
        assert not RAW.search(text), repr(text)
    assert SHOWN in result.stdout and SHOWN in _terminal(report)
    junit = tmp_path / "junit.xml"
    write_junit(report, junit)
    failure = ET.parse(junit).getroot().find(".//failure")
    assert failure is not None and SHOWN in failure.get("message") and SHOWN in failure.text
    lines = annotations(report)
    assert all(not RAW.search(line) for line in lines) and SHOWN in lines[0]
    page = render_html(report, tmp_path)
    assert not RAW.search(page) and SHOWN in page
    traces = [run["trace"] for run in report["legs"][0]["runs"]]
    for argv in (("show", traces[0], "--step", str(d["step"])), ("compare", *traces)):
        shown = run_cli(*argv)
        assert shown.code in (0, 1), shown.stderr
        assert not RAW.search(shown.stdout + shown.stderr) and SHOWN in shown.stdout


def test_a_hostile_huge_error_is_escaped_and_cut(tmp_path):
    result = _exec(tmp_path, "fails.py", FAILS, "-q")
    assert result.code == 3, result.stderr
    report = result.report
    run = report["legs"][0]["runs"][0]
    assert run["status"] == "failed"
    assert re.search(r"… \(1,048,\d{3} characters\)\Z", run["error"])  # cut, its length said
    assert len(run["error"]) <= DATA_LIMIT and "RuntimeError: \x1b[2J boom \x01" in run["error"]
    assert len((tmp_path / "fails.py.json").read_text()) < HUGE
    assert len(Path(report["out_dir"], "report.json").read_text()) < HUGE
    page = Path(report["html"]).read_text(encoding="utf-8")
    assert len(page) < HUGE and "characters)" in page and not RAW.search(page)
    line = result.stderr.strip()  # -q: the failure in one line
    assert line.count("\n") == 0 and len(line) < 2 * TEXT_LIMIT and not RAW.search(line)
    assert "\\x1b[2J boom \\x01" in line
    shown = _terminal(report)
    assert not RAW.search(shown) and "\\x1b[2J boom \\x01" in shown
    assert max(len(text) for text in shown.splitlines()) < 2 * TEXT_LIMIT


def _script(tmp_path: Path) -> str:
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    return str(script)


OUTPUT_ERRORS = [
    (("exec", "--json", "{missing}/r.json"), "--json: no such folder: {missing}/ (for "),
    (("exec", "--html", "{tmp}"), "--html: a folder, not a file: {tmp}/"),
    (("exec", "--html", "{file}/r.html"), "--html: not a folder: {file} (for "),
    (("exec", "--out", "{file}/sub"), "--out: not a folder: {file} (for "),
    (("record", "-o", "{missing}/g.sqlite"), "--output: no such folder: {missing}/ (for "),
    (("check", "--against", "g.sqlite", "--junit", "{missing}/j.xml"), "--junit: no such"),
    (("check", "--against", "g.sqlite", "--junit", "{tmp}"), "--junit: a folder, not a file"),
    (("doctor", "--json", "{missing}/d.json"), "--json: no such folder"),
]
RANGE_ERRORS = [
    (("exec", "--steps", "0"), "--steps: 0 is out of range (at least 1)"),
    (("exec", "-n", "0"), "-n: 0 is out of range 1..1000"),
    (("exec", "--repeats=5000"), "--repeats: 5000 is out of range 1..1000"),
    (("exec", "--jobs", "0"), "--jobs: 0 is out of range (at least 1)"),
    (("exec", "-j0"), "-j: 0 is out of range (at least 1)"),
    (("exec", "--timeout", "0"), "--timeout: 0 is out of range (at least 0.1)"),
    (("exec", "--seed", "-1"), "--seed: -1 is out of range (at least 0)"),
    (("record", "-o", "{tmp}/g.sqlite", "--steps", "0"), "--steps: 0 is out of range (at least 1)"),
    (("record", "-o", "{tmp}/g.sqlite", "-j", "0"), "-j: 0 is out of range (at least 1)"),
    (("check", "--against", "g.sqlite", "--steps", "0"), "--steps: 0 is out of range"),
    (("check", "--against", "g.sqlite", "-n", "0"), "-n: 0 is out of range (at least 1)"),
    (("check", "--against", "g.sqlite", "--timeout", "0"), "--timeout: 0 is out of range"),
    (("doctor", "--steps", "0"), "--steps: 0 is out of range (at least 1)"),
]


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["", "quiet"])
@pytest.mark.parametrize(("argv", "needle"), OUTPUT_ERRORS + RANGE_ERRORS)
def test_a_mistake_on_the_command_line_is_one_line_before_any_run(tmp_path, argv, needle, quiet):
    (tmp_path / "file").write_text("")
    names = {
        "tmp": str(tmp_path),
        "missing": str(tmp_path / "missing"),
        "file": str(tmp_path / "file"),
    }
    argv = [part.format(**names) for part in argv]
    out = tmp_path / "out"
    command, *options = argv  # a case's own --out comes after this one: it wins
    result = run_cli(
        command, "--out", str(out), *options, *quiet, "--", "python", _script(tmp_path)
    )
    assert result.code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        result.stderr.startswith("reprocheck: error: ") and needle.format(**names) in result.stderr
    )
    assert not out.exists() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["", "quiet"])
def test_run_steps_zero_on_a_config_is_one_line(tmp_path, quiet):
    out = tmp_path / "out"
    result = run_cli("run", str(CONFIGS / "demo.yaml"), "--steps", "0", *quiet, "--out", str(out))
    assert (result.code, result.stderr) == (
        2,
        "reprocheck: error: --steps: 0 is out of range (at least 1)\n",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--steps", "0", "--", "python", "train.py"],
        ["record", "-o", "missing/g.sqlite", "--", "python", "train.py"],
        ["run", "config.yaml", "--json", "missing/r.json"],
    ],
)
def test_the_checks_answer_before_torch_is_imported(tmp_path, argv):
    assert _cli_in_a_fresh_interpreter(argv, tmp_path) == ("False", "2")
