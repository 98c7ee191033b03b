"""A seeded script whose data collator adds jitter from `np.random.default_rng()` — a
generator built from OS entropy, as copied augmentation snippets do. No preset can seed
it: the first batch differs in every run. `--seeded` builds it with a seed.
"""

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeded", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0) if args.seeded else np.random.default_rng()

    def collate(batch):
        x = torch.stack([item[0] for item in batch])
        y = torch.stack([item[1] for item in batch])
        return x + torch.from_numpy(rng.normal(0, 0.01, x.shape)).float(), y

    torch.manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8, collate_fn=collate
    )
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
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
