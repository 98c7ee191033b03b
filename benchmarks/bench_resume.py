"""What a resume audit costs against the runs it stands for.

``reprocheck resume --at K --with "--resume" -- python SCRIPT`` runs the reference, the
stopped run, the resumed run and a control. Its wall-clock time is set against the three
plain runs a user would make by hand, one after the other — the script to N, to K, then
resumed to N — measured in the same process, interleaved, medians of the repeats, torch on
one thread. The audit runs two at a time (reference beside stopped, resumed beside
control) on this machine's two cores.

    python benchmarks/bench_resume.py [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"
CASES = {
    "plain loop (MLP, 12 steps)": ("resume_plain.py", "--resume", ()),
    "transformers Trainer (12 steps)": ("resume_hf.py", "--resume out/checkpoint-4", ()),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _seconds(command: list[str], cwd: str) -> float:
    began = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - began


def plain_runs(script: str, resume: str, extra: tuple[str, ...]) -> float:
    """The three runs by hand: to N, to K, then resumed from K's checkpoint to N."""
    path = str(SCRIPTS / script)
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        total = _seconds([sys.executable, path, *extra], first)
        total += _seconds([sys.executable, path, "--steps", "4", *extra], second)
        words = resume.split()
        total += _seconds([sys.executable, path, *extra, *words], second)
    return total


def audit(script: str, resume: str, extra: tuple[str, ...], control: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "reprocheck", "resume", "--at", "4", "--with", resume,
            "--control", control, "-q", "--out", out, "--", "python", str(SCRIPTS / script),
            *extra,
        ]  # fmt: skip
        began = time.perf_counter()
        code = subprocess.run(command, cwd=out, env=ENV, capture_output=True).returncode
        if code != 0:
            raise SystemExit(f"the resume audit of {script} ended with exit {code}")
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, (script, resume, extra) in CASES.items():
        plain, bare, full = [], [], []
        for _ in range(args.repeats):  # interleaved: the machine's load falls on all three
            plain.append(plain_runs(script, resume, extra))
            bare.append(audit(script, resume, extra, "none"))
            full.append(audit(script, resume, extra, "auto"))
        p, b, f = (statistics.median(x) for x in (plain, bare, full))
        rows.append(
            [name, f"{p:.1f} s", f"{b:.1f} s", f"{b / p:.2f}×", f"{f:.1f} s", f"{f / p:.2f}×"]
        )
    head = ["script", "3 plain runs", "audit, no control", "ratio", "audit + control", "ratio"]
    print(table(head, rows, args.markdown))


if __name__ == "__main__":
    main()
