"""Data-parallel training with the gradients averaged by hand (``dist.all_reduce``).

Shape: the "Distributed Training" example of the PyTorch tutorial "Writing Distributed
Applications with PyTorch" -- ``partition_dataset`` gives each rank its own slice,
``average_gradients(model)`` all-reduces every parameter's gradient and divides by the
world size, then a plain SGD step; run under ``torchrun`` (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 allreduce_train.py [--steps N]

Planted, one option each (the default reproduces and its replicas agree):
``--noise-rank R``: rank R adds noise drawn from entropy to its gradients before the
all-reduce (runs differ from the all-reduce's input, and both ranks receive it);
``--clip-rank R``: rank R clips its gradients after the all-reduce (replicas part).
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def partition_dataset(rank, world_size, generator):
    x = torch.randn(128, 10, generator=generator)
    y = (x[:, :2].sum(dim=1) > 0).long()
    size = len(x) // world_size
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def average_gradients(model):
    world_size = float(dist.get_world_size())
    for param in model.parameters():
        dist.all_reduce(param.grad.data, op=dist.ReduceOp.SUM)
        param.grad.data /= world_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--noise-rank", type=int, default=-1)
    parser.add_argument("--clip-rank", type=int, default=-1)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)
    x, y = partition_dataset(rank, world_size, torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    noise = torch.Generator()
    noise.seed()
    for step in range(args.steps):
        start = (step * args.batch_size) % len(x)
        data, target = x[start : start + args.batch_size], y[start : start + args.batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        if rank == args.noise_rank:
            for param in model.parameters():
                param.grad += 1e-6 * torch.randn(param.grad.shape, generator=noise)
        average_gradients(model)
        if rank == args.clip_rank:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
    if rank == 0:
        print(f"final loss {loss.item()!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
