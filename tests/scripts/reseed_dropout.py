"""A script that re-seeds torch's generator from entropy before training.

Shape: the common "seed once at the top" script in which a later line undoes it —
here `torch.seed()` (a library call, a copied snippet) after the model is built. The
weights are identical in every run; the dropout masks drawn during training are not.

Exercises: a first observable divergence at step 1 · outputs (dropout's output) whose
cause is the generator state that differed from step 0 (`torch.cpu`).
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-reseed", action="store_true", help="keep the seeded generator")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.linspace(-1, 1, 64 * 8).reshape(64, 8)
    target = torch.arange(64) % 3
    if not args.no_reseed:
        torch.seed()  # re-seeds the default generator from OS entropy
    for step in range(args.steps):
        batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
        loss = F.cross_entropy(model(data[batch]), target[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
