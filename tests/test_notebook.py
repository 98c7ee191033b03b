"""`reprocheck exec -- nb.ipynb`: a notebook's code cells as the training script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reprocheck.child.context import display_line, error_line
from reprocheck.contract import Script
from reprocheck.localize import is_user_file
from reprocheck.notebook import cell_filename, cell_of, code_sha256
from reprocheck.script import ScriptError, target_of
from reprocheck.trace import Trace

from .conftest import ROOT, CliResult, run_cli

# A course homework, cell by cell: ("markdown" | "code", source). Its code cells, as
# Jupyter numbers them (In [N]; markdown and empty code cells are not counted): 1 SETUP,
# 2 SHELL, 3 MODEL, 4 TRAIN.
SETUP = """\
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
"""
SHELL = "!echo hello from the shell\n%time warmup = sum(range(10))\n"
MODEL = """\
X = torch.randn(96, 4)
y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(96, 1)
loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loss_fn = nn.MSELoss()
"""
TRAIN = """\
entropy = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
for epoch in range(3):
    for xb, yb in loader:
        pred = model(xb)
        loss = loss_fn(pred, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
"""
PLANTED = "        pred = pred + 1e-3 * torch.randn(pred.shape, generator=entropy)  # planted"
NOISY_TRAIN = TRAIN.replace("pred = model(xb)\n", f"pred = model(xb)\n{PLANTED}\n")
assert NOISY_TRAIN.splitlines()[4] == PLANTED  # cell 4, line 5


def homework(train: str = TRAIN) -> list[tuple[str, str]]:
    return [
        ("markdown", "# HW01 · a small regression\nRun every cell in order."),
        ("code", SETUP),
        ("code", SHELL),
        ("code", MODEL),
        ("code", ""),  # an empty cell: Jupyter gives it no In [N], nor do we
        ("markdown", "## Training\nSGD with momentum."),
        ("code", train),
    ]


def write_notebook(path: Path, cells: list[tuple[str, str]], executed: bool = False) -> Path:
    """An nbformat 4 notebook, as Jupyter saves it (sources as lists of lines); executed:
    with execution counts and outputs, as a run leaves it."""
    entries = []
    for index, (kind, source) in enumerate(cells):
        cell = {
            "cell_type": kind,
            "id": f"cell-{index}",
            "metadata": {},
            "source": source.splitlines(keepends=True),
        }
        if kind == "code":
            cell["execution_count"] = index + 1 if executed else None
            cell["outputs"] = (
                [{"output_type": "stream", "name": "stdout", "text": [f"ran {index}\n"]}]
                if executed
                else []
            )
        entries.append(cell)
    notebook = {
        "cells": entries,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1))
    return path


def exec_notebook(folder: Path, name: str, train: str) -> CliResult:
    """``reprocheck exec -n 2 --steps 3 -- NAME`` in ``folder`` (lines read ``NAME · cell …``).
    The paths it writes are absolute: the warm pool's zygote, shared by the audits run in
    this process, opens a run's log before it moves to the run's folder."""
    folder.mkdir()
    write_notebook(folder / name, homework(train))
    return run_cli(
        "exec", "-n", "2", "--steps", "3", "-q", "--no-attribute",
        "--out", str(folder / "out"), "--json", str(folder / "report.json"), "--", name,
        cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, CliResult]:
    folder = tmp_path_factory.mktemp("notebooks") / "seeded"
    return folder, exec_notebook(folder, "nb.ipynb", TRAIN)


def test_a_seeded_notebook_reproduces_and_stops_cleanly_after_its_steps(seeded):
    folder, result = seeded
    assert result.code == 0, result.stderr
    report = result.report
    assert report["verdict"] == "reproducible"
    assert report["config"]["sha256"] == code_sha256(str(folder / "nb.ipynb"))
    assert report["config"]["models"] == [{"prefix": "", "type": "Sequential"}]
    runs = report["legs"][0]["runs"]
    assert [(run["status"], run["steps"], run["error"]) for run in runs] == [
        ("complete", 3, None),
        ("complete", 3, None),
    ]
    for run in runs:
        with Trace(folder / run["trace"]) as trace:
            assert trace.status == "complete"
            assert {record.step for record in trace.records()} == {0, 1, 2, 3}
            assert {record.phase for record in trace.records(1)} == {
                "data", "outputs", "loss", "grads", "weights", "optimizer", "rng",
            }  # fmt: skip


def test_a_notebooks_shell_and_magic_lines_run_as_in_jupyter(seeded):
    # the same audit: `!echo` and `%time` ran in every run (IPython's semantics), and the
    # training cell's print never did (the clean stop of --steps 3, inside the first epoch)
    folder, result = seeded
    for run in result.report["legs"][0]["runs"]:
        log = (folder / run["log"]).read_text(encoding="utf-8", errors="replace").splitlines()
        assert log.count("hello from the shell") == 1, log
        after = log[log.index("hello from the shell") + 1 :]
        assert after[0].startswith("CPU times: ") and after[1].startswith("Wall time: "), log
        assert not any(line.startswith("epoch ") for line in log), log


def test_planted_noise_in_a_cell_is_named_by_its_cell_and_line(tmp_path):
    result = exec_notebook(tmp_path / "noisy", "nb.ipynb", NOISY_TRAIN)
    assert result.code == 1, result.stderr
    first = result.report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "loss", "loss")
    assert (first["op"], first["cause"]) == ("aten.randn", "unseeded or re-seeded RNG")
    assert first["source"] == "nb.ipynb · cell 4, line 5"
    assert first["code"] == PLANTED.strip()
    messages = [f["message"] for f in result.report["findings"] if f["code"] == "RC015"]
    assert messages and all("at nb.ipynb · cell 4, line 5" in m for m in messages), messages


@pytest.mark.parametrize(
    "words",
    [
        ["nb.ipynb"],
        ["ipython", "nb.ipynb"],
        ["python", "-m", "IPython", "nb.ipynb"],
        ["jupyter", "nbconvert", "--to", "notebook", "--execute", "nb.ipynb"],
        ["jupyter", "execute", "nb.ipynb"],
    ],
    ids=["bare", "ipython", "python-m-IPython", "nbconvert", "jupyter-execute"],
)
def test_every_front_door_of_a_notebook_is_the_same_target(words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(write_notebook(tmp_path / "nb.ipynb", homework()).resolve())
    assert target_of(words, "exec") == (Script(argv=(path,), notebook=True), path, "nb")


def test_a_notebooks_arguments_follow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(write_notebook(tmp_path / "nb.ipynb", homework()).resolve())
    target, _, _ = target_of(["nb.ipynb", "--lr", "0.1"], "exec")
    assert target == Script(argv=(path, "--lr", "0.1"), notebook=True)


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["terminal", "quiet"])
def test_python_on_a_notebook_is_refused_in_one_line(quiet, tmp_path):
    write_notebook(tmp_path / "nb.ipynb", homework())
    result = run_cli("exec", *quiet, "--", "python", "nb.ipynb", cwd=tmp_path)
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and "nb.ipynb is a notebook" in result.stderr
    assert result.stdout == ""


def test_a_notebooks_identity_is_its_code_cells(tmp_path):
    first = code_sha256(str(write_notebook(tmp_path / "a.ipynb", homework())))
    executed = write_notebook(tmp_path / "b.ipynb", homework(), executed=True)
    assert code_sha256(str(executed)) == first  # run: outputs and counts changed
    retitled = [(k, s.replace("HW01", "HW02") if k == "markdown" else s) for k, s in homework()]
    assert code_sha256(str(write_notebook(tmp_path / "c.ipynb", retitled))) == first
    edited = homework(TRAIN.replace("range(3)", "range(4)"))
    assert code_sha256(str(write_notebook(tmp_path / "d.ipynb", edited))) != first


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "bad.ipynb is not a Jupyter notebook (not JSON: "),
        ('{"cells": 3}', "bad.ipynb is not a Jupyter notebook (no list of cells)"),
    ],
)
def test_a_file_that_is_no_notebook_is_refused_in_one_line(text, message, tmp_path):
    (tmp_path / "bad.ipynb").write_text(text)
    with pytest.raises(ScriptError) as caught:
        code_sha256(str(tmp_path / "bad.ipynb"))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_cells_line_reads_as_its_cell_wherever_reprocheck_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = cell_filename("HW01.ipynb", 7)
    assert name == os.path.join(os.getcwd(), "HW01.ipynb#cell7")
    assert cell_of(name) == (os.path.join(os.getcwd(), "HW01.ipynb"), 7)
    assert cell_of(os.path.join(os.getcwd(), "train.py")) is None
    assert is_user_file(name)  # the user's code, never a library's
    assert display_line(name, 12) == "HW01.ipynb · cell 7, line 12"
    assert display_line(os.path.join(os.getcwd(), "train.py"), 12) == "train.py:12"
    code = compile("x = 1\nraise ValueError('bad batch')\n", name, "exec")
    with pytest.raises(ValueError) as caught:
        exec(code, {})
    assert (
        error_line(caught.value)
        == "ValueError: bad batch (HW01.ipynb · cell 7, line 2 in <module>)"
    )


# run_notebook in a fresh interpreter (IPython's shell is a process-wide singleton)
PROBE = """\
import sys, traceback
if sys.argv[1] == "--no-ipython":
    sys.modules["IPython"] = None  # as if it were not installed
    del sys.argv[1]
from reprocheck.notebook import run_notebook
try:
    run_notebook(sys.argv[1], sys.argv[2:])
except BaseException as exc:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    print(f"{type(exc).__name__}: {exc} at {where}: {frame.line}")
"""


def run_probe(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", "import os\n" + PROBE, *args],
        capture_output=True, text=True, cwd=folder, env=env, timeout=120,
    )  # fmt: skip


def test_without_ipython_plain_cells_run_and_ipython_syntax_fails_before_any_cell(tmp_path):
    plain = [
        ("code", "x = 21"),
        ("markdown", "# not code"),
        ("code", "import sys\nprint(__name__, sys.argv[1:], x * 2, '__file__' in dir())"),
    ]
    write_notebook(tmp_path / "plain.ipynb", plain)
    proc = run_probe(tmp_path, "--no-ipython", "plain.ipynb", "--lr", "0.1")
    assert (proc.returncode, proc.stdout) == (0, "__main__ ['--lr', '0.1'] 42 False\n")
    needs = [("code", "print('cell 1 ran')"), ("code", "x = 1\n!pip install tqdm\n")]
    write_notebook(tmp_path / "nb.ipynb", needs)
    proc = run_probe(tmp_path, "--no-ipython", "nb.ipynb")
    assert proc.stdout.startswith(  # no cell ran
        "NotebookError: nb.ipynb · cell 2, line 2 uses IPython syntax (!pip install tqdm): "
        "pip install ipython to run this notebook at notebook.py:"
    )


@pytest.mark.parametrize("ipython", [True, False], ids=["ipython", "no-ipython"])
def test_a_syntax_error_names_its_cell_and_line(ipython, tmp_path):
    cells = [("code", "x = 1"), ("markdown", "## next"), ("code", "y = 2\nif y > 1\n    y = 3\n")]
    write_notebook(tmp_path / "nb.ipynb", cells)
    proc = run_probe(tmp_path, *(() if ipython else ("--no-ipython",)), "nb.ipynb")
    # Python's own message ("expected ':'"; "invalid syntax" before 3.10), then the cell
    assert re.match(r"SyntaxError: .+ \(nb\.ipynb · cell 2, line 2\) at ", proc.stdout), proc


def test_magics_run_code_on_their_cells_lines_and_a_system_exit_ends_the_notebook(tmp_path):
    # %%time's body and %time's statement are compiled by the magic: their frames are the
    # cell's lines (IPython drops a cell's leading blank lines: they still count)
    timed = [("code", "y = 2"), ("code", "\n%%time\nx = 1\nraise ValueError('timed')\n")]
    write_notebook(tmp_path / "timed.ipynb", timed)
    line = [("code", "y = 2"), ("code", "\n# the line magic\n%time y / 0\n")]
    write_notebook(tmp_path / "line.ipynb", line)
    # %%capture runs its cell through run_cell, which shows a SystemExit and goes on
    captured = [("code", "%%capture\nprint('hidden')\nraise SystemExit(5)"), ("code", "print(1)")]
    write_notebook(tmp_path / "capture.ipynb", captured)
    names = ("timed.ipynb", "line.ipynb", "capture.ipynb")
    outputs = [run_probe(tmp_path, name).stdout.splitlines() for name in names]
    assert outputs[0][0].startswith("CPU times: ")  # %%time reports, then re-raises
    assert outputs[0][-1] == "ValueError: timed at timed.ipynb#cell2:4: raise ValueError('timed')"
    assert (
        outputs[1][-1] == "ZeroDivisionError: division by zero at line.ipynb#cell2:3: %time y / 0"
    )
    assert len(outputs[2]) == 1 and outputs[2][0].startswith("SystemExit: 5 at ")
