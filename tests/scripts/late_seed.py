"""A seeded script whose model class defines `__hash__` and `__eq__` from state its
`__init__` sets last (as torchmetrics' metrics do), trained with dropout and a shuffled
DataLoader.

By default it seeds at its top, before anything draws. `--late` builds the model first
and seeds one line later (the `seed_everything` placed too late): under reprocheck's
preset the runs agree (the preset seeded before the first line); run as its user runs
it, every run starts from other weights.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Scorer(nn.Module):
    """Hashes and compares by its configuration, which `__init__` sets at its end."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(width, 1)
        self._signature = ("scorer", width)

    def __hash__(self) -> int:
        return hash(self._signature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scorer) and self._signature == other._signature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--late", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.late:
        model = Scorer()
        torch.manual_seed(0)
    else:
        torch.manual_seed(0)
        model = Scorer()
    data = TensorDataset(torch.randn(64, 6), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(loader, start=1):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == args.steps:
            break
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
