"""Sharded data-parallel training with FSDP2 (``fully_shard``) under ``torchrun`` (gloo, CPU).

Shape: the FSDP2 example of pytorch/examples ``distributed/FSDP2`` and torchtitan's
``parallelize`` -- a model of residual blocks, ``fully_shard`` applied to each block and
then to the root, ``AdamW`` over the sharded (DTensor) parameters, per-rank batches from a
generator seeded with the rank, gradient-norm clipping, loss logged on rank 0.

    torchrun --standalone --nproc_per_node 2 fsdp2_train.py [--steps N] [--entropy-rank R]

``--entropy-rank R`` plants nondeterminism: rank R draws its batches from a generator seeded
from entropy (runs differ on rank R from step 1).
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Model(nn.Module):
    def __init__(self, dim, depth, classes):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def main():
    parser = argparse.ArgumentParser(description="FSDP2 training under torchrun")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entropy-rank", type=int, default=-1)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    model = Model(args.dim, args.depth, classes=4)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    generator = torch.Generator()
    if rank == args.entropy_rank:
        generator.seed()  # planted: this rank's batches from entropy
    else:
        generator.manual_seed(args.seed + rank)
    for step in range(args.steps):
        x = torch.randn(args.batch_size, args.dim, generator=generator)
        y = torch.randint(0, 4, (args.batch_size,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if rank == 0:
        print(f"final loss {loss.item()!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
