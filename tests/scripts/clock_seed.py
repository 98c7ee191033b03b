"""A script seeded from the clock: a "random seed per run" that makes no run repeat.

Shape: the `seed = int(time.time())` idiom of many research scripts (meant to vary the
seed between experiments), followed by a plain model, optimizer and training loop.

Exercises: the initial weights already differ (step 0 · weights); the cause is the
`torch.manual_seed` call, named with its line and the two values it got.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    seed = time.time_ns() % 2**31
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.linspace(-1, 1, 32 * 8).reshape(32, 8), torch.arange(32) % 2
    for _ in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
