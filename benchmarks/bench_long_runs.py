"""What recording costs a long job, per step: full, sparse and sampled records against a
plain step, at three model sizes with AdamW, torch on one thread.

A plain MLP training loop, recorded through :class:`~reprocheck.recorder.StepRecorder` as
the config loop records (data, outputs, loss, gradients, weights, optimizer state,
generators): ``full`` hashing on the training thread, ``full, beside`` with the large
tensors hashed on a thread beside it (a core free: torch runs on one), ``sparse``,
``every 10``. All modes run in one process, ``--block`` steps each in turn (the machine's
drift falls on all alike; a thread hashing beside training overlaps its own run's next
steps, as in an audit); per-step wall times are taken around each step (start-up is never
in them), medians over the steps after the first block, leaving out each block's first
step (the mode before's thread may still be hashing then). Where the time goes: the time
in the recorder's calls on the training thread (its CPU cost there), the hashing floor —
the bytes a step hashes divided by the fingerprint's bandwidth on the same tensors,
measured in the same process — the step log's write and SQLite's folds, timed inside the
recorder, and the hashing thread's own CPU time. Peak memory: each mode alone in a fresh
process.

    python benchmarks/bench_long_runs.py [--steps 40] [--block 5] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table

# (name, width, layers, batch): ~1M, ~10M, ~40M parameters; the batch sets the step time
# (≈ 20 ms, 200 ms, 1 s on one thread of this machine)
SIZES = [("~1M", 1024, 1, 280), ("~10M", 1600, 4, 250), ("~40M", 2560, 6, 330)]
MODES = ["plain", "full", "full, beside", "sparse", "every 10"]


class Loop:
    """One model, its AdamW and (but ``plain``) its recorder, stepped on the same batch."""

    def __init__(self, width: int, layers: int, batch: int, mode: str, steps: int, folder: str):
        import torch

        from reprocheck.config import PHASES
        from reprocheck.contract import Recording
        from reprocheck.recorder import StepRecorder, parameter_names
        from reprocheck.trace import TraceWriter

        torch.manual_seed(0)
        blocks: list[torch.nn.Module] = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.model = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 10))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.names = parameter_names(self.model)
        self.x, self.y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
        self.trace = os.path.join(folder, f"{mode.replace(' ', '')}-{time.monotonic_ns()}.sqlite")
        self.recorder = None
        self.times: list[float] = []
        self.inside: list[float] = []
        self.logged_s = 0.0  # time in the trace's step log (its write, SQLite's folds)
        self.step = 0
        if mode != "plain":
            recording = {
                "full": Recording(),
                "full, beside": Recording(),
                "sparse": Recording("sparse"),
                "every 10": Recording("sparse", 10),
            }[mode]
            self.recorder = StepRecorder(
                TraceWriter(self.trace, {}),
                PHASES,
                recording=recording,
                last=steps,
                hash_thread=mode == "full, beside",
            )
            log_step = self.recorder.writer.log_step

            def timed_log(*args: object) -> None:
                began = time.perf_counter()
                log_step(*args)  # type: ignore[arg-type]
                self.logged_s += time.perf_counter() - began

            self.recorder.writer.log_step = timed_log  # type: ignore[method-assign]
            self.recorder.begin(0)
            self.recorder.state(self.model, [self.optimizer], self.names)
            self.recorder.commit(0, None)

    def run(self) -> None:
        import torch

        from reprocheck.recorder import batch_tensors, flatten

        clock = time.perf_counter
        started = clock()
        self.step += 1
        rec, model, optimizer = self.recorder, self.model, self.optimizer
        inside = 0.0  # time in the recorder's calls, on the training thread
        if rec:
            began = clock()
            rec.begin(self.step)
            rec.add_all("data", batch_tensors((self.x, self.y)))
            inside += clock() - began
        out = model(self.x)
        loss = torch.nn.functional.cross_entropy(out, self.y)
        if rec:
            began = clock()
            rec.add_all("outputs", flatten(out, "output"))
            rec.add_all("loss", [("loss", loss)])
            inside += clock() - began
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if rec:
            began = clock()
            rec.grads(model)
            inside += clock() - began
        optimizer.step()
        if rec:
            began = clock()
            rec.state(model, [optimizer], self.names)
            rec.commit(self.step, loss)
            inside += clock() - began
        self.times.append(clock() - started)
        self.inside.append(inside)
        self.out, self.loss = out, loss

    def floor(self) -> tuple[int, float]:
        """(bytes a recorded step hashes, seconds the fingerprint takes over them)."""
        from reprocheck.fingerprint import fingerprint

        model, optimizer = self.model, self.optimizer
        tensors = [self.x, self.y, self.out.detach(), self.loss.detach()]
        tensors += [p.grad for p in model.parameters()] + [p.detach() for p in model.parameters()]
        tensors += [v for s in optimizer.state.values() for v in s.values() if v.dim()]
        began = time.perf_counter()
        for _ in range(3):
            for t in tensors:
                fingerprint(t)
        return sum(t.numel() * t.element_size() for t in tensors), (time.perf_counter() - began) / 3


def timed(width: int, layers: int, batch: int, steps: int, block: int, folder: str) -> dict:
    """Every mode in this process, ``block`` steps each in turn (the machine's drift falls
    on all alike; a thread hashing beside training overlaps its own run's next steps, as in
    an audit). The first step of each block is left out of the medians: the thread of the
    mode before may still be hashing then."""
    import torch

    from reprocheck import recorder

    torch.set_num_threads(1)
    hashing: list[float] = []  # the hashing thread's CPU time, per job (one a step)
    hash_jobs = recorder._hash_jobs

    def timed_jobs(*args: object) -> None:
        began = time.thread_time()
        hash_jobs(*args)  # type: ignore[arg-type]
        hashing.append(time.thread_time() - began)

    recorder._hash_jobs = timed_jobs  # type: ignore[assignment]
    loops = {mode: Loop(width, layers, batch, mode, steps, folder) for mode in MODES}
    kept: dict[str, list[int]] = {mode: [] for mode in MODES}
    for _ in range(steps // block):
        for mode, loop in loops.items():
            for index in range(block):
                loop.run()
                if index:
                    kept[mode].append(len(loop.times) - 1)
    for loop in loops.values():
        if loop.recorder:
            loop.recorder.drain()
            loop.recorder.writer.finish("complete")
    hashed, floor = loops["full"].floor()

    def median(mode: str, values: list[float]) -> float:
        return statistics.median(values[i] for i in kept[mode] if i >= block)  # warm

    return {
        "step_s": {mode: median(mode, loop.times) for mode, loop in loops.items()},
        "hashing_s": statistics.median(hashing[steps // 2 :]),
        "inside_s": {mode: median(mode, loop.inside) for mode, loop in loops.items()},
        "log_s": loops["full"].logged_s / loops["full"].step,
        "bytes_per_step": {
            mode: os.path.getsize(loop.trace) / (loop.step + 1)
            for mode, loop in loops.items()
            if loop.recorder
        },
        "params": sum(p.numel() for p in loops["plain"].model.parameters()),
        "hashed_bytes": hashed,
        "floor_s": floor,
    }


def peak(width: int, layers: int, batch: int, mode: str, steps: int, folder: str) -> dict:
    """One mode alone in this process: its peak resident memory."""
    import torch

    torch.set_num_threads(1)
    loop = Loop(width, layers, batch, mode, steps, folder)
    for _ in range(steps):
        loop.run()
    if loop.recorder:
        loop.recorder.drain()
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(*args: object) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def whole_audits(steps: int, repeats: int) -> list[list[str]]:
    """``reprocheck exec -n 2`` of a long script (tests/scripts/late_noise.py, a ~0.4-ms
    step) recorded each way, its canary and observer runs included, against the two plain
    runs it stands for, one after the other; medians of ``repeats``, interleaved."""
    script = str(Path(__file__).resolve().parent.parent / "tests" / "scripts" / "late_noise.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ways = {"full": (), "sparse": ("--record", "sparse"), "every 10": ("--every", "10")}
    times: dict[str, list[float]] = {"plain": [], **{way: [] for way in ways}}

    def clock(command: list[str], cwd: str) -> float:
        began = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        return time.perf_counter() - began

    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            plain = [sys.executable, script, "--steps", str(steps)]
            times["plain"].append(clock(plain, folder) + clock(plain, folder))
            for way, options in ways.items():
                command = [sys.executable, "-m", "reprocheck", "exec", "-n", "2", "-q",
                           "--no-as-is-check", "--out", folder, *options, "--", "python",
                           script, "--steps", str(steps)]  # fmt: skip
                times[way].append(clock(command, folder))
    plain = statistics.median(times["plain"])
    cells = [f"{steps:,} steps", f"{plain:.1f} s"]
    for way in ways:
        took = statistics.median(times[way])
        cells.append(f"{took:.1f} s ({took / plain:.2f}×)")
    return [cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--block", type=int, default=5, help="steps of a mode in a row")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--audits-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.audits_only:
        head = ["job", "2 plain runs", "audit, full", "audit, sparse", "audit, every 10"]
        print(table(head, whole_audits(2000, 3), args.markdown))
        return
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps((timed if kind == "timed" else peak)(*rest)))
        return
    costs, parts = [], []
    for name, width, layers, batch in SIZES:
        with tempfile.TemporaryDirectory() as folder:
            found = _child("timed", width, layers, batch, args.steps, args.block, folder)
            memory = {m: _child("peak", width, layers, batch, m, 5, folder) for m in MODES}
        step, inside, floor = found["step_s"], found["inside_s"], found["floor_s"]
        plain, log_s = step["plain"], found["log_s"]
        costs.append(
            [
                name,
                f"{found['params'] / 1e6:.1f}M",
                f"{plain * 1e3:.0f} ms",
                *(f"{step[m] / plain:.3f}×" for m in MODES[1:]),
                f"{inside['full'] / floor:.2f}×",
                f"{(inside['full, beside'] + found['hashing_s']) / floor:.2f}×",
            ]
        )
        parts.append(
            [
                name,
                f"{(step['full'] - plain) * 1e3:.1f} ms",
                f"{inside['full'] * 1e3:.1f} ms",
                f"{floor * 1e3:.1f} ms ({found['hashed_bytes'] / 2**20:.0f} MiB)",
                f"{log_s * 1e3:.2f} ms",
                f"{(inside['full'] - floor - log_s) * 1e3:.1f} ms",
                f"{inside['full, beside'] * 1e3:.1f} ms",
                *(f"{found['bytes_per_step'][m]:,.0f} B" for m in ("full", "sparse", "every 10")),
                " / ".join(f"{memory[m]['peak_mib']:.0f}" for m in MODES) + " MiB",
            ]
        )
    head = ["model", "parameters", "plain step", *MODES[1:]]
    head += ["recording's CPU ÷ hash floor, full", "beside (both threads)"]
    print(table(head, costs, args.markdown))
    print()
    head = [
        "model",
        "full: step's extra wall time",
        "full: in the recorder's calls",
        "of which the hash floor (bytes)",
        "the step log + SQLite",
        "the rest (per-record Python)",
        "beside: in the recorder's calls",
        "trace, full",
        "trace, sparse",
        "trace, every 10",
        "peak RSS " + " / ".join(MODES),
    ]
    print(table(head, parts, args.markdown))
    print()
    head = ["job", "2 plain runs", "audit, full", "audit, sparse", "audit, every 10"]
    print(table(head, whole_audits(2000, 3), args.markdown))


if __name__ == "__main__":
    main()
