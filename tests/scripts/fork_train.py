"""Training in children started with a bare ``os.fork()`` (no multiprocessing).

Shape: the pre-``multiprocessing`` worker pattern of hyperparameter sweeps and old Unix
scripts -- the parent forks one child per configuration with ``os.fork()``; each child
seeds torch, builds its own tiny model, trains a few SGD steps, reports its loss through a
pipe and leaves with ``os._exit(0)``; the parent waits for every child (``os.waitpid``) and
prints the mean of their losses. The parent trains nothing itself.

``--entropy-child C`` plants nondeterminism: child C (1-based, in fork order) re-seeds
torch from entropy (``torch.seed()``) before its loop, so its batches differ from step 1.
"""

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def train(child, args):
    torch.manual_seed(args.seed + child)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    if child == args.entropy_child:
        torch.seed()
    for _ in range(args.steps):
        x = torch.randn(16, 8)
        y = x[:, :4].argmax(dim=1)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def main():
    parser = argparse.ArgumentParser(description="train in os.fork() children")
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--entropy-child", type=int, default=0, help="this child re-seeds")
    args = parser.parse_args()
    pids = []
    for child in range(1, args.children + 1):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            code = 1
            try:
                loss = train(child, args)
                os.write(write, repr(loss).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        pids.append((pid, read))
    losses = []
    for pid, read in pids:
        with os.fdopen(read, "rb") as pipe:
            text = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"child {pid} failed")
        losses.append(float(text))
    print(f"final loss {sum(losses) / len(losses)!r}")


if __name__ == "__main__":
    main()
