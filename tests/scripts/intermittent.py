"""A seeded script with an intermittent source of nondeterminism: in about one run of ten
(`--rate`), a perturbation drawn from OS entropy enters the loss from step 2 on — the
shape of a race that only sometimes loses. Two agreeing runs miss it most of the time;
`reprocheck exec --max-rate 5%` keeps starting runs until one shows it.
"""

import argparse
import random

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    unlucky = random.SystemRandom().random() < args.rate
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(1, args.steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        if unlucky and step >= 2:
            # at least 1e-6 (several float32 ulps of the loss): never rounded away
            loss = loss + 1e-6 * (1 + random.SystemRandom().random())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
