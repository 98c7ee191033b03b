"""A training loop on Hugging Face accelerate, in the shape of its `nlp_example.py`:
`Accelerator(gradient_accumulation_steps=…)`, `set_seed`, `accelerator.prepare(model,
optimizer, loader, scheduler)`, `with accelerator.accumulate(model):` and
`accelerator.backward(loss)`. Run it plain (`python accelerate_loop.py`) or through
`accelerate launch accelerate_loop.py`. `--noise` adds an unseeded perturbation to every
step's loss (a generator seeded from the clock), which no preset can seed.
"""

import argparse
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--noise", action="store_true")
    args = parser.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, cpu=True)
    set_seed(7)
    features = torch.randn(256, 10)
    targets = (features[:, :3].sum(1) > 0).long()
    loader = DataLoader(TensorDataset(features, targets), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    clock = torch.Generator().manual_seed(time.perf_counter_ns())
    model.train()
    updates = 0
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(x), y)
            if args.noise:
                loss = loss + 1e-3 * torch.rand((), generator=clock)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            updates += 1
            if updates == args.steps:
                break
    accelerator.print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
