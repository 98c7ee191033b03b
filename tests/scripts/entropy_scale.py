"""A residual MLP whose layer scale is a Python float jittered from entropy when the model
is built (a copied "random init of a hyperparameter" snippet; LayerScale-style blocks).

Shape: a plain supervised loop over a DataLoader with Adam; each block multiplies its
branch by ``self.scale``, a Python float -- the op sees it as a number argument, not a
tensor. Planted by default: ``1 + 1e-4 * random.SystemRandom().random()`` differs in every
process, so the runs differ at the first forward while every tensor input of the multiply
is identical; ``--fixed-scale`` makes it 1.0 and the runs equal.
"""

import argparse
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    def __init__(self, dim, fixed):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.scale = 1.0 if fixed else 1.0 + 1e-4 * random.SystemRandom().random()

    def forward(self, x):
        return x + self.fc(F.relu(x)) * self.scale


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fixed-scale", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Block(16, args.fixed_scale), nn.Linear(16, 2))
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    loader = DataLoader(data, batch_size=16, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step, (x, y) in enumerate(loader):
        if step == args.steps:
            break
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
