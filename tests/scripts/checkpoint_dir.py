"""A script that keeps its checkpoints and log in a folder of the working directory, in the
shape of most example trainers (`--output_dir`, `ckpt.pt` saved at every evaluation,
the best one loaded back at the end).

Run twice at once in one folder, both runs write `checkpoints/ckpt.pt` and
`checkpoints/train.log`: `reprocheck exec -- python checkpoint_dir.py` says so (RC031);
`--output_dir out/{run}` gives each run its own folder.
"""

import argparse
import os

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="checkpoints")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    best = float("inf")
    path = os.path.join(args.output_dir, "ckpt.pt")
    with open(os.path.join(args.output_dir, "train.log"), "w") as log:
        for step in range(args.steps):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            log.write(f"step {step} loss {loss.item()}\n")
            if loss.item() < best:
                best = loss.item()
                torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path))
    print(f"final loss {nn.functional.mse_loss(model(x), y).item()!r}")


if __name__ == "__main__":
    main()
