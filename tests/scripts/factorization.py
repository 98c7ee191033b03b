"""Matrix factorisation trained the plain way (a recommender's first model): user and item
factors and an item bias, each read by advanced indexing, MSE on ratings, SGD.

Backward accumulates every lookup's gradient through `index_put_`, nondeterministic on CPU
with 2 threads (audit with `--threads 2`). Backward runs in reverse: the item bias's
lookup (the last line of the forward) is accumulated first, the factors' after it — so the
first op that differs can belong to another tensor than the first record that differs.
"""

import argparse

import torch
from torch import nn


class Factorization(nn.Module):
    def __init__(self, users: int = 64, items: int = 16, rank: int = 32):
        super().__init__()
        self.user_factors = nn.Parameter(torch.randn(users, rank) * 0.1)
        self.item_factors = nn.Parameter(torch.randn(items, rank) * 0.1)
        self.item_bias = nn.Parameter(torch.zeros(items))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.user_factors[users]
        v = self.item_factors[items]
        return (u * v).sum(dim=1) + self.item_bias[items]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    users, items = torch.randint(0, 64, (16384,)), torch.randint(0, 16, (16384,))
    ratings = torch.rand(16384) * 5
    model = Factorization()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(args.steps):
        loss = nn.functional.mse_loss(model(users, items), ratings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
