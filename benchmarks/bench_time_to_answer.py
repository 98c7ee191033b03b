"""Time to answer: how long a user waits, as ratios to one plain training process.

The reference is the fixed cost every run pays before its first step: ``python -c`` that
imports torch, builds an optimizer and takes one step (the step imports ``torch._dynamo``).
Measured side by side in one run, each case in turn within every repeat, medians:

- ``reprocheck --help`` and a command-line usage error (no torch is imported);
- the audit of ``configs/demo.yaml`` (``make demo``'s job);
- ``configs/nondeterministic-index.yaml`` end to end: runs, replay with zoom, attribution;
- the start of a run from the warm pool: a fork of a ready zygote until its trace exists.

Every case runs under the three pool settings, so the table shows what the pool buys:
``REPROCHECK_POOL=0`` (every run a fresh interpreter), ``1`` (the default: run 0 of each
leg starts fresh; the other runs, replays, attribution and probes fork) and ``all`` (run 0
forks too). Each audit's answer is checked (the demo reproduces; the index case diverges
at ``aten.index_put``, a nondeterministic op, fixed by RC010 and RC011): a time of a wrong
answer would mean nothing.
``python benchmarks/bench_time_to_answer.py [--repeats N] [--markdown]``.
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
PLAIN = (
    "import torch; p = torch.zeros(4, requires_grad=True); "
    "o = torch.optim.SGD([p], lr=0.1); p.sum().backward(); o.step()"
)


MODES = ("0", "1", "all")


def _env(mode: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPROCHECK_POOL": mode}
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def _wall(command: list[str], env: dict[str, str], ok: tuple[int, ...] = (0, 1, 2)) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode not in ok:
        raise SystemExit(f"{command} exited {proc.returncode}: {proc.stderr.decode()[-400:]}")
    return seconds


def _answer(expect: str, command: list[str], env: dict[str, str], folder: Path) -> float:
    """An audit's wall time; it must give the expected answer, or the time means nothing."""
    report = folder / f"report-{time.monotonic_ns()}.json"
    seconds = _wall([*command, "--json", str(report)], env, ok=(0, 1))
    found = json.loads(report.read_text(encoding="utf-8"))
    got = found["verdict"]
    if expect == "index":
        first = found.get("first_divergence") or {}
        codes = sorted(f["code"] for f in found.get("findings", []))
        got = f"{got} {first.get('op')} {first.get('cause')} {codes}"
        expect = "diverged aten.index_put nondeterministic op ['RC010', 'RC011']"
    if got != expect:
        raise SystemExit(f"{command[-1]} under {env['REPROCHECK_POOL']}: {got} (expected {expect})")
    return seconds


def _fork_start(folder: Path) -> float:
    """Seconds from asking a ready zygote for a run to the run's trace existing."""
    sys.path.insert(0, str(ROOT))
    from reprocheck.config import config_to_dict
    from reprocheck.configfile import load_config
    from reprocheck.contract import RunSpec
    from reprocheck.determinism import child_environment
    from reprocheck.parent import pool

    config = load_config(ROOT / "configs" / "demo.yaml")
    env = child_environment(config.determinism, 1)
    zygote = pool.zygote(env)
    while not zygote.ready:
        zygote.pump(wait=0.05)
    trace = folder / f"fork-{time.monotonic_ns()}.sqlite"
    spec = RunSpec(
        config=config_to_dict(config),
        config_path=config.path,
        base_dir=str(ROOT / "configs"),
        leg="cpu-t1",
        device="cpu",
        threads=1,
        compile=None,
        run=0,
        steps=1,
        trace=str(trace),
    )
    spec_path = folder / (trace.stem + ".spec.json")
    spec.write(str(spec_path))
    started = time.perf_counter()
    process = pool.spawn(env, str(spec_path), str(folder / (trace.stem + ".log")))
    assert process is not None
    while not trace.exists():
        time.sleep(0.001)
    seconds = time.perf_counter() - started
    process.wait()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        audit = [py, "-m", "reprocheck", "run", "-q", "--out", str(out)]
        cases = {
            "plain process (reference)": lambda mode: _wall([py, "-c", PLAIN], _env(mode)),
            "reprocheck --help": lambda mode: _wall([py, "-m", "reprocheck", "--help"], _env(mode)),
            "usage error (run --bogus)": lambda mode: _wall(
                [py, "-m", "reprocheck", "run", "--bogus"], _env(mode)
            ),
            "demo audit (make demo)": lambda mode: _answer(
                "reproducible", [*audit, "configs/demo.yaml"], _env(mode), out
            ),
            "nondeterministic-index end to end": lambda mode: _answer(
                "index", [*audit, "configs/nondeterministic-index.yaml"], _env(mode), out
            ),
        }
        fork = "a run's start: fork of a warm zygote"
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for name, run in cases.items():
                for mode in MODES:
                    times.setdefault((name, mode), []).append(run(mode))
            times.setdefault((fork, "1"), []).append(_fork_start(out))
    plain = [t for mode in MODES for t in times[("plain process (reference)", mode)]]
    reference = statistics.median(plain)
    header = ["case", *(f"POOL={mode}: s · × plain" for mode in MODES)]
    rows = []
    for name in [*cases, fork]:
        cells = [name]
        for mode in MODES:
            found = times.get((name, mode))
            seconds = statistics.median(found) if found else None
            ratio = None if seconds is None else seconds / reference
            cells.append("–" if seconds is None else f"{seconds:.2f} s · {ratio:.2f}×")
        rows.append(cells)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
    else:
        for cells in [header, *rows]:
            print("  ".join(f"{c:>26}" for c in cells))
    print(f"\nreference: {reference:.2f} s (median of {len(plain)}); repeats {args.repeats}")


if __name__ == "__main__":
    main()
