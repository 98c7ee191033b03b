"""What recording costs a training script per step, through the hooks ``reprocheck exec``
puts into it: a GPT-shaped script (benchmarks/gpt_steps.py, AdamW, torch on one thread)
run plain and under ``exec -n 1 --threads 1`` recorded three ways — full with the hashing
on the training thread (``REPROCHECK_HASH_THREAD=0``), full hashed beside training (a
core is free: the run uses one), sparse. The script times its own steps (start-up is
never in them); medians of the steps after two of warm-up, over all repeats, the ways
interleaved in each repeat (the machine's drift falls on all alike).

    python benchmarks/bench_script_hooks.py [--steps 12] [--repeats 2] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "gpt_steps.py")
# (name, width, layers, batch): ~10M and ~40M parameters, ≈ 200 ms and ≈ 1 s steps here
SIZES = [("~10M", 384, 6, 2), ("~40M", 640, 8, 3)]
WAYS: dict[str, tuple[str, tuple[str, ...]] | None] = {
    "plain": None,
    "full": ("0", ()),
    "full, beside": ("1", ()),
    "sparse": ("0", ("--record", "sparse")),
}


def _run(way: str, size: tuple, steps: int, folder: str) -> tuple[list[float], str]:
    """One run of the script: its step times after warm-up, and what it printed."""
    _, width, layers, batch = size
    times = os.path.join(folder, f"{way}.jsonl")
    script = [SCRIPT, "--width", str(width), "--layers", str(layers), "--batch", str(batch)]
    script += ["--steps", str(steps), "--times", times]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(REPROCHECK_CANARY="0", REPROCHECK_OBSERVER="0", REPROCHECK_AS_IS="0")
    setting = WAYS[way]
    if setting is None:
        command = [sys.executable, *script]
    else:
        env["REPROCHECK_HASH_THREAD"] = setting[0]
        command = [sys.executable, "-m", "reprocheck", "exec", "-n", "1", "--threads", "1",
                   "-q", "--no-attribute", "--out", os.path.join(folder, way), *setting[1],
                   "--", "python", *script]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        raise SystemExit(f"{way}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    with open(times, encoding="utf-8") as handle:
        taken = [json.loads(line) for line in handle]
    return taken[2:], done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for size in SIZES:
        taken: dict[str, list[float]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                with tempfile.TemporaryDirectory() as folder:
                    times, _ = _run(way, size, args.steps, folder)
                taken[way] += times
        plain = statistics.median(taken["plain"])
        rows.append(
            [
                size[0],
                f"{plain * 1e3:.0f} ms",
                *(f"{statistics.median(taken[way]) / plain:.3f}×" for way in list(WAYS)[1:]),
            ]
        )
    head = ["model", "plain step", *(f"exec, {way}" for way in list(WAYS)[1:])]
    print(table(head, rows, args.markdown))


if __name__ == "__main__":
    main()
