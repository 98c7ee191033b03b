"""The Python API: record a custom loop with `reprocheck.Recorder`, and audit a training
function N times with `reprocheck.audit`.

    python examples/api_recorder.py
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import reprocheck


def train(steps: int = 5, trace: str | None = None) -> float:
    """A custom loop (no DataLoader: data made in the loop), recorded when given a trace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recording = reprocheck.Recorder(model, optimizer, trace=trace) if trace else nullcontext()
    with recording as recorder:
        for _ in range(steps):
            x = torch.randn(32, 8)
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if recorder is not None:
                recorder.step(batch=x, loss=loss)
    return loss.item()


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    train(trace=str(folder / "a.sqlite"))
    train(trace=str(folder / "b.sqlite"))
    print(f"two traces in {folder}: compare them with")
    print(f"  reprocheck compare {folder / 'a.sqlite'} {folder / 'b.sqlite'}")
    report = reprocheck.audit(train, repeats=2, out=folder / "reports")
    print(
        f"audit(train): {report['verdict']}, {report['legs'][0]['runs'][0]['steps']} steps per run"
    )


if __name__ == "__main__":
    main()
