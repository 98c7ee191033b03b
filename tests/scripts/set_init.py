"""A model initialised layer by layer in the order of a `set` of its layers.

Shape: custom-initialisation code that collects the layers to re-initialise in a set
(`{m for m in model.modules() if isinstance(m, nn.Linear)}` — to skip duplicates of tied
or shared layers) and draws each one's weights in turn. A set of modules iterates in
address order: the layers draw from torch's generator in an order that changes from one
process to the next, so the initial weights differ although the script seeds torch. No
control fixes it (PYTHONHASHSEED does not reach `id()`-based hashes); `--list` keeps the
modules' own order and repeats.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="model.modules() order: the fix")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*(layer for _ in range(12) for layer in (nn.Linear(16, 16), nn.Tanh())))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in linears if args.list else set(linears):
        nn.init.normal_(layer.weight, std=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    for _ in range(args.steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
