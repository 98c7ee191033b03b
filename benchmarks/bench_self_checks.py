"""What the canary and the observer cost: the demo audit and a script's audit with both
(the default) and with neither (``REPROCHECK_CANARY=0 REPROCHECK_OBSERVER=0``), side by
side in one run, each case in turn within every repeat; medians. Each audit's answer is
checked (reproducible, the canary caught, the observer agreeing).

``python benchmarks/bench_self_checks.py [--repeats N] [--markdown]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "demo audit (configs/demo.yaml)": ["run", "configs/demo.yaml"],
    "script audit (tests/scripts/late_seed.py)": [
        "exec",
        "--no-as-is-check",
        "--",
        "python",
        "tests/scripts/late_seed.py",
    ],
}


def _audit(words: list[str], checks: bool, folder: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPROCHECK_AS_IS": "0"}
    env["REPROCHECK_CANARY"] = env["REPROCHECK_OBSERVER"] = "1" if checks else "0"
    report = folder / f"r{time.monotonic_ns()}.json"
    split = words.index("--") if "--" in words else len(words)
    command = [
        sys.executable, "-m", "reprocheck", *words[:split], "-q", "--no-attribute",
        "--out", str(folder), "--json", str(report), *words[split:],
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    answer = json.loads(report.read_text())
    if proc.returncode != 0 or answer["verdict"] != "reproducible":
        raise SystemExit(f"{words}: {answer['verdict']} ({proc.stderr.decode()[-300:]})")
    if checks and not (answer["canary"]["caught"] and answer["observer"]["agrees"]):
        raise SystemExit(f"{words}: the canary or the observer failed")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    times: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, words in CASES.items():
                for checks in (False, True):
                    times.setdefault((name, checks), []).append(_audit(words, checks, Path(tmp)))
    rows = []
    for name in CASES:
        without = statistics.median(times[(name, False)])
        with_checks = statistics.median(times[(name, True)])
        rows.append((name, without, with_checks, with_checks / without))
    if args.markdown:
        print("| case | neither | canary + observer | ratio |")
        print("|---|---|---|---|")
        for name, a, b, ratio in rows:
            print(f"| {name} | {a:.2f} s | {b:.2f} s | {ratio:.2f}× |")
    else:
        for name, a, b, ratio in rows:
            print(f"{name:45s} {a:6.2f} s {b:6.2f} s {ratio:5.2f}×")
    print(f"\nmedians of {args.repeats}, side by side")


if __name__ == "__main__":
    main()
