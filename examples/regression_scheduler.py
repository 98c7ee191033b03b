"""Regression with an MLP, AdamW and a cosine learning-rate schedule.

python examples/regression_scheduler.py --epochs 3
"""

import argparse
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g) * 4 - 2
    y = (x[:, :1] * x[:, 1:2]).sin() + 0.5 * x[:, 2:3] - x[:, 3:4] ** 2 / 4
    return TensorDataset(x, y + 0.05 * torch.randn(n, 1, generator=g))


class Regressor(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x):
        return self.net(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--exit-code", type=int, default=0, help="exit with this status at the end")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    loader = DataLoader(make_data(args.n, args.seed), batch_size=64, shuffle=True)
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs * len(loader)
    )
    try:
        for epoch in range(args.epochs):
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
            print(f"epoch {epoch}: loss {loss.item():.5f} lr {scheduler.get_last_lr()[0]:.5f}")
    except KeyboardInterrupt:
        print("interrupted: saving what we have")
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
