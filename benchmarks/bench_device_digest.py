"""Dispatched ops and time per recorded step of the device-side (torchmix) digest.

One training step of an L-layer MLP with Adam is recorded with every phase on (data,
outputs, loss, grads, weights, optimizer state, generators). A ``TorchDispatchMode``
counts the aten ops the recorder dispatches — on a GPU each is a kernel launch (or a
view) — for the batched digest (a phase's small tensors mixed by one chain of ops) and
for the digest taken tensor by tensor, side by side in one process. The digests of both
are checked equal.

    python benchmarks/bench_device_digest.py [--device cuda] [--layers 10 200] [--markdown]

On CPU it runs the device path under REPROCHECK_HASHER=torch (set here).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from _table import table  # benchmarks/, run as a script

os.environ.setdefault("REPROCHECK_HASHER", "torch")  # before reprocheck is imported

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reprocheck.config import PHASES
from reprocheck.determinism import cpu_model
from reprocheck.recorder import StepRecorder, parameter_names
from reprocheck.trace import TraceWriter

fp = importlib.import_module("reprocheck.fingerprint")


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def mlp(layers: int, width: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks).to(device)


def recorded_steps(
    layers: int, device: str, batched: bool, steps: int = 4, width: int = 64
) -> tuple[list[int], list[float], int, list[bytes]]:
    """(ops per recorded step, seconds the recorder took per step, records per step, the
    last step's digests) of ``steps`` training steps, every phase recorded."""
    fp._BATCH_WORDS = DEFAULT_BATCH_WORDS if batched else -1  # -1: every tensor alone
    model = mlp(layers, width, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    names = parameter_names(model)
    x = torch.randn(32, width, device=device)
    y = torch.randn(32, width, device=device)
    ops, seconds, records, digests = [], [], 0, []
    with tempfile.TemporaryDirectory() as folder:
        writer = TraceWriter(Path(folder) / "t.sqlite", {})
        recorder = StepRecorder(writer, PHASES)
        for step in range(steps):
            recorder.begin(step)
            out = model(x)
            loss = torch.nn.functional.mse_loss(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            counter = OpCount()
            start = time.perf_counter()
            # the last step is counted, the others timed (the count slows what it counts)
            with counter if step == steps - 1 else contextlib.nullcontext():
                recorder.add_all("data", [("x", x), ("y", y)])
                recorder.add_all("outputs", [("out", out)])
                recorder.add_all("loss", [("loss", loss)])
                recorder.grads(model)
                recorder.state(model, [optimizer], names)
                digests, _ = recorder._hasher.finish()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            ops.append(counter.ops)
            records = len(digests)
            recorder._ids = type(recorder._ids)("I")  # this step is not written
            recorder._phase_index = 0
        writer.finish("complete")
    fp._BATCH_WORDS = DEFAULT_BATCH_WORDS
    return ops, seconds, records, digests


DEFAULT_BATCH_WORDS = fp._BATCH_WORDS


def measure(layers_list: list[int], device: str, repeats: int) -> list[dict]:
    rows = []
    for layers in layers_list:
        row: dict = {"layers": layers}
        for batched in (True, False):
            ops, seconds, records, digests = recorded_steps(layers, device, batched, 3 + repeats)
            key = "batched" if batched else "per tensor"
            row[key] = {"ops": ops[-1], "ms": statistics.median(seconds[2:-1]) * 1e3}
            row["records"] = records
            row.setdefault("digests", []).append(digests)
        first, second = row.pop("digests")
        row["equal"] = first == second
        rows.append(row)
    return rows


def render(rows: list[dict], markdown: bool) -> str:
    head = [
        "layers",
        "records/step",
        "ops/step batched",
        "ops/step per tensor",
        "ms/step batched",
        "ms/step per tensor",
        "per tensor ÷ batched (time)",
        "digests equal",
    ]
    body = [
        [
            str(r["layers"]),
            f"{r['records']:,}",
            f"{r['batched']['ops']:,}",
            f"{r['per tensor']['ops']:,}",
            f"{r['batched']['ms']:.1f}",
            f"{r['per tensor']['ms']:.1f}",
            f"{r['per tensor']['ms'] / r['batched']['ms']:.1f}×",
            "yes" if r["equal"] else "NO",
        ]
        for r in rows
    ]
    return table(head, body, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.layers, args.device, args.repeats)
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(
        f"{where}, torch {torch.__version__}, python {platform.python_version()}, "
        f"hasher {fp.hasher_name(args.device)}, torch threads {torch.get_num_threads()}"
    )
    print(render(rows, args.markdown))
    if not all(r["equal"] for r in rows):
        raise SystemExit("the batched and per-tensor digests differ")


if __name__ == "__main__":
    main()
