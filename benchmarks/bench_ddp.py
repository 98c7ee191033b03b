"""The cost of recording a 2-rank DDP step (gloo, CPU): a torchrun job plain, and the same
job under ``reprocheck exec`` (every phase of every rank recorded, the replica check read
from the rank traces afterwards), side by side in one run.

The marginal cost of a step is what matters (a job's start-up — torchrun's rendezvous,
each rank importing torch — is paid once): each variant runs a short and a long job, and
the cost per step is the difference of their wall times over the difference of their
steps; medians of ``--repeats`` runs, interleaved.

    python benchmarks/bench_ddp.py [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _table import table  # benchmarks/, run as a script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
STEPS_PER_EPOCH = 3  # 96 samples, 2 ranks, batches of 16


def wall(command: list[str]) -> float:
    """Seconds the command took, start to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def commands(epochs: int, out: str) -> dict[str, list[str]]:
    job = [*TORCHRUN, str(SCRIPT), "--epochs", str(epochs)]
    return {
        "torchrun": [sys.executable, *job],
        "reprocheck exec": [
            sys.executable, "-m", "reprocheck", "exec", "-n", "1", "-q", "--no-attribute",
            "--no-measure", "--out", out, "--json", f"{out}/report-{epochs}.json",
            "--", "python", *job,
        ],
    }  # fmt: skip


def measure(repeats: int, short: int, long: int) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[int, list[float]]] = {}
    checks: list[float] = []  # the replica check of the long job, read from its report
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            for epochs in (short, long):
                for name, command in commands(epochs, out).items():
                    samples.setdefault(name, {}).setdefault(epochs, []).append(wall(command))
            report = json.loads(Path(out, f"report-{long}.json").read_text())
            checks.append(report["timings"]["replicas_s"])
    steps = (long - short) * STEPS_PER_EPOCH
    rows = {}
    for name, by_epochs in samples.items():
        first, last = statistics.median(by_epochs[short]), statistics.median(by_epochs[long])
        rows[name] = {"short_s": first, "long_s": last, "ms_per_step": (last - first) / steps * 1e3}
    rows["reprocheck exec"]["replica_check_s"] = statistics.median(checks)
    return rows


def render(rows: dict[str, dict[str, float]], short: int, long: int, markdown: bool) -> str:
    plain = rows["torchrun"]["ms_per_step"]
    head = [
        "job",
        f"{short * STEPS_PER_EPOCH} steps (s)",
        f"{long * STEPS_PER_EPOCH} steps (s)",
        "ms per step",
        "÷ plain",
    ]
    body = [
        [
            name,
            f"{r['short_s']:.2f}",
            f"{r['long_s']:.2f}",
            f"{r['ms_per_step']:.2f}",
            f"{r['ms_per_step'] / plain:.2f}×",
        ]
        for name, r in rows.items()
    ]
    return table(head, body, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2, help="epochs of the short job")
    parser.add_argument("--long", type=int, default=1000, help="epochs of the long job")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = measure(args.repeats, args.short, args.long)
    from reprocheck.determinism import cpu_model

    print(
        f"{cpu_model()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        "2 ranks (gloo), OMP_NUM_THREADS=1"
    )
    print(render(rows, args.short, args.long, args.markdown))
    check = rows["reprocheck exec"]["replica_check_s"]
    print(
        f"replica check of the {args.long * STEPS_PER_EPOCH}-step job, from its rank traces "
        f"after the run: {check:.2f} s ({check / (args.long * STEPS_PER_EPOCH) * 1e3:.3f} ms "
        "per step); no online check runs during training"
    )


if __name__ == "__main__":
    main()
