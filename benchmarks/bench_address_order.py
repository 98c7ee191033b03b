"""Address order: how often two runs iterate a `set` of modules in the same order.

`tests/scripts/set_init.py` initialises 12 layers in the order of a `set` of them (address
order), so its final loss tells the order apart. A verdict can only see this divergence if
its two runs draw different orders; this counts, over every pair of runs, how often two
draw the same one (lower is better: that is the chance an audit misses the divergence):

- fresh interpreters of `python set_init.py`, hash seed random and fixed (0);
- runs forked from one warm zygote through reprocheck's launcher (`REPROCHECK_POOL=all`,
  hash seed 0), as replays, controls and the verdict's runs after run 0 are;
- a fork against a fresh interpreter (what a verdict compares: run 0 starts fresh).

``python benchmarks/bench_address_order.py [--fresh N] [--forks M] [--markdown]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _table import table  # benchmarks/, run as a script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "set_init.py"
LOSS = re.compile(r"final loss (\S+)")


def _loss(text: str) -> str:
    found = LOSS.search(text)
    if found is None:
        raise SystemExit(f"set_init.py printed no final loss: {text[-300:]!r}")
    return found.group(1)


def fresh(count: int, hashseed: str | None) -> list[str]:
    """Final losses of fresh interpreters, two at a time (the machine's cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONHASHSEED", None)
    if hashseed is not None:
        env["PYTHONHASHSEED"] = hashseed
    losses: list[str] = []
    for start in range(0, count, 2):
        procs = [
            subprocess.Popen(
                [sys.executable, str(SCRIPT)], env=env, stdout=subprocess.PIPE, text=True
            )
            for _ in range(min(2, count - start))
        ]
        losses += [_loss(proc.communicate()[0]) for proc in procs]
    return losses


def forked(count: int) -> tuple[list[str], int]:
    """Final losses of runs forked from one zygote by the launcher (and how many forked)."""
    os.environ["REPROCHECK_POOL"] = "all"
    os.environ["PYTHONHASHSEED"] = "0"
    sys.path.insert(0, str(ROOT))
    from reprocheck.parent.launch import Launcher, plan_legs
    from reprocheck.script import script_config

    config, target = script_config(["python", str(SCRIPT)], "exec", repeats=count)
    leg = plan_legs(config)[0]
    with tempfile.TemporaryDirectory() as folder:
        (leg,), _ = Launcher(config, folder, fail_fast=False, target=target).run([leg])
        losses = [_loss(Path(run.log).read_text(encoding="utf-8")) for run in leg.runs]
    return losses, sum(run.forked for run in leg.runs)


def same(a: list[str], b: list[str] | None = None) -> tuple[int, int]:
    """(pairs that drew the same order, pairs): within ``a``, or across ``a`` × ``b``."""
    pairs = list(itertools.combinations(a, 2) if b is None else itertools.product(a, b))
    return sum(x == y for x, y in pairs), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", type=int, default=60, help="fresh interpreters per hash seed")
    parser.add_argument("--forks", type=int, default=120, help="forked runs")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    random_seed = fresh(args.fresh, None)
    seed_zero = fresh(args.fresh, "0")
    forks, nforked = forked(args.forks)
    if nforked != len(forks):
        raise SystemExit(f"only {nforked} of {len(forks)} runs forked (REPROCHECK_POOL=all)")
    rows = []
    for label, runs, (hits, pairs) in (
        ("fresh, hash seed random", random_seed, same(random_seed)),
        ("fresh, PYTHONHASHSEED=0", seed_zero, same(seed_zero)),
        ("forks of one zygote, PYTHONHASHSEED=0", forks, same(forks)),
        ("a fork against a fresh interpreter", forks + seed_zero, same(forks, seed_zero)),
    ):
        rows.append(
            [label, f"{len(set(runs))}", f"{hits:,} of {pairs:,}", f"{100 * hits / pairs:.2f}%"]
        )
    print(
        table(["runs", "distinct orders", "pairs in the same order", "rate"], rows, args.markdown)
    )


if __name__ == "__main__":
    main()
