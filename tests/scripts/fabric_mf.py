"""Matrix factorisation trained with Lightning Fabric, in the shape of Fabric's own
examples: `Fabric(accelerator="cpu")`, `fabric.seed_everything`, `fabric.setup(model,
optimizer)`, `fabric.setup_dataloaders(loader)`, `fabric.backward(loss)`.

The model's user and item factors are read by advanced indexing (`self.item_factors[items]`):
their backward accumulates through `index_put_`, nondeterministic on CPU with 2 threads.
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Factorization(nn.Module):
    def __init__(self, users: int = 64, items: int = 16, rank: int = 32):
        super().__init__()
        self.user_factors = nn.Parameter(torch.randn(users, rank) * 0.1)
        self.item_factors = nn.Parameter(torch.randn(items, rank) * 0.1)
        self.item_bias = nn.Parameter(torch.zeros(items))

    def forward(self, users, items):
        dot = (self.user_factors[users] * self.item_factors[items]).sum(dim=1)
        return dot + self.item_bias[items]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(3)
    users, items = torch.randint(0, 64, (16384,)), torch.randint(0, 16, (16384,))
    ratings = torch.rand(16384) * 5
    loader = DataLoader(TensorDataset(users, items, ratings), batch_size=4096, shuffle=True)
    model = Factorization()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    for step, (u, i, r) in enumerate(loader, start=1):
        loss = nn.functional.mse_loss(model(u, i), r)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        if step == args.steps:
            break
    fabric.print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
