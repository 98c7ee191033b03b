"""A plain PyTorch loop that checkpoints and resumes, written the way training scripts do.

An MLP with dropout on a synthetic regression set (40 rows, batches of 8: 5 batches an
epoch, so 12 steps cross two epoch boundaries), a shuffled DataLoader with its own
`torch.Generator`, AdamW, a LambdaLR that changes the lr every step, and optionally a
`GradScaler`. Every `--save-every` steps (after `opt.step()` and `sched.step()`) it
overwrites `--ckpt` (default `ckpt.pt`, relative to the working directory) with a dict:

    model, optimizer, scheduler, scaler (with --scaler), rng (torch, random, numpy),
    data (epoch, batch index within it, the loader generator's state at the epoch's start),
    step

`--resume` loads `--ckpt` and continues to `--steps`: resuming mid-epoch rebuilds the same
permutation from the saved generator state and skips the batches already used.
`--omit PART` (repeatable; weights, optimizer, scheduler, rng, data, scaler) leaves PART
out of the checkpoint, and so out of the resume.

Resume for `reprocheck resume`: `--with "--resume"` (add the same `--omit`/`--scaler`
options to both). Saves at steps 4, 8, 12 by default.

Measured (torch 2.13 CPU, one thread; run to 12 vs run to 4 then `--resume` to 12, final
weights compared bitwise; also with `--save-every 3` and `5`, an epoch's end):
  - nothing omitted: identical (also with `--scaler`, and with `--scaler --fp16`);
  - `--omit weights`, `optimizer`, `scheduler`, `rng` (dropout) or `data`: differ;
  - `--scaler --omit scaler`: weights identical, only the final scale differs (2**22 vs
    2**18). The scale is a power of two, so scaling the loss and unscaling the float32
    grads is exact: only the scaled `.grad` after `backward()` and the scale differ;
  - `--scaler --fp16 --omit scaler`: differ. Under float16 autocast the scaled grads
    overflow, `scaler.step` skips `opt.step()` and halves the scale, so the scale decides
    which steps run. Note: the script counts loop iterations, not `opt.step()` calls:
    with `--scaler --fp16` iterations 7 and 8 are skipped (9 `opt.step()` calls in 12
    iterations; the saves come after calls 4, 6 and 9).
"""

import argparse
import hashlib
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PARTS = ("weights", "optimizer", "scheduler", "rng", "data", "scaler")


def make_dataset(rows: int = 40, features: int = 10) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(rows, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    y = x @ w + 0.1 * torch.randn(rows, 1, generator=generator)
    return TensorDataset(x, y)


class MLP(nn.Module):
    def __init__(self, features: int = 10, hidden: int = 32, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def warmup_decay(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.9**step


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--ckpt", default="ckpt.pt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--omit", action="append", default=[], choices=PARTS)
    parser.add_argument("--scaler", action="store_true", help="use a GradScaler")
    parser.add_argument("--fp16", action="store_true", help="forward under float16 autocast")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    dataset = make_dataset()
    loader_gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=loader_gen)

    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay)
    scaler = None
    if args.scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)

    step, epoch, skip = 0, 0, 0
    if args.resume:
        ckpt = torch.load(args.ckpt, weights_only=False)
        if "model" in ckpt:
            model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if "data" in ckpt:
            epoch, skip = ckpt["data"]["epoch"], ckpt["data"]["batch"]
            loader_gen.set_state(ckpt["data"]["generator"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(ckpt["rng"]["random"])
            np.random.set_state(ckpt["rng"]["numpy"])
        step = ckpt["step"]
        print(f"resumed from {args.ckpt} at step {step} (epoch {epoch}, batch {skip})")

    def save(epoch_start: torch.Tensor, batch: int) -> None:
        ckpt = {"step": step}
        if "weights" not in args.omit:
            ckpt["model"] = model.state_dict()
        if "optimizer" not in args.omit:
            ckpt["optimizer"] = opt.state_dict()
        if "scheduler" not in args.omit:
            ckpt["scheduler"] = sched.state_dict()
        if scaler is not None and "scaler" not in args.omit:
            ckpt["scaler"] = scaler.state_dict()
        if "rng" not in args.omit:
            ckpt["rng"] = {
                "torch": torch.get_rng_state(),
                "random": random.getstate(),
                "numpy": np.random.get_state(),
            }
        if "data" not in args.omit:
            ckpt["data"] = {"epoch": epoch, "batch": batch, "generator": epoch_start}
        torch.save(ckpt, args.ckpt)
        print(f"step {step}: saved {args.ckpt}")

    model.train()
    loss = torch.tensor(float("nan"))
    while step < args.steps:
        epoch_start = loader_gen.get_state()
        for batch, (x, y) in enumerate(loader):
            if batch < skip:
                continue
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16, enabled=args.fp16):
                out = model(x)
            loss = F.mse_loss(out.float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            step += 1
            if step % args.save_every == 0:
                save(epoch_start, batch + 1)
            if step >= args.steps:
                break
        skip = 0
        epoch += 1

    if scaler is not None:
        print(f"scale {scaler.get_scale()!r}")
    print(f"weights {digest(model)}")
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
