"""Training in worker processes started by ``torch.multiprocessing`` (spawn or fork).

Shape: the ``mp.spawn`` / ``mp.Process`` worker pattern of pytorch/examples
distributed/rpc and mnist_hogwild -- ``run_worker(rank, world_size, args)`` seeds with
``torch.manual_seed(args.seed + rank)`` (as mnist_hogwild's ``train`` does), builds its own
tiny model and trains a few SGD steps on tensors it generates; ``main()`` starts the
workers with ``torch.multiprocessing.spawn(..., join=True)`` under ``__main__`` or, with
``--start fork``, with ``get_context("fork").Process`` objects started and joined by hand.

Exercises: the training happens only in child processes (the parent does none); each
worker prints its own loss and sends it back on a queue, and the parent prints the mean.
``--entropy-rank R`` plants nondeterminism: worker R seeds with ``torch.seed()``;
``--reseed R:K``: worker R re-seeds from entropy before its K-th step (its batches then
differ from step K on).
"""

import argparse
import sys

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def run_worker(rank, world_size, args, queue):
    if rank == args.entropy_rank:
        torch.seed()
    else:
        torch.manual_seed(args.seed + rank)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)
    data = torch.randn(64, 8)
    target = (data[:, :4].argmax(dim=1) + rank) % 4
    model.train()
    reseed_rank, reseed_at = map(int, args.reseed.split(":")) if args.reseed else (-1, 0)
    for step in range(1, args.steps + 1):
        if rank == reseed_rank and step == reseed_at:
            torch.seed()
        idx = torch.randint(0, data.size(0), (args.batch_size,))
        optimizer.zero_grad()
        loss = F.nll_loss(model(data[idx]), target[idx])
        loss.backward()
        optimizer.step()
    sys.stdout.write(f"rank {rank} of {world_size}: loss {loss.item()!r}\n")
    sys.stdout.flush()
    queue.put((rank, loss.item()))


def main():
    parser = argparse.ArgumentParser(description="train in spawned/forked workers")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--start", choices=["spawn", "fork"], default="spawn")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--entropy-rank", type=int, default=-1, help="this worker seeds from entropy"
    )
    parser.add_argument("--reseed", help="R:K — worker R re-seeds from entropy before step K")
    args = parser.parse_args()
    world_size = args.nprocs
    queue = mp.get_context(args.start).SimpleQueue()
    if args.start == "spawn":
        mp.spawn(run_worker, args=(world_size, args, queue), nprocs=world_size, join=True)
    else:
        ctx = mp.get_context("fork")
        processes = []
        for rank in range(world_size):
            p = ctx.Process(target=run_worker, args=(rank, world_size, args, queue))
            p.start()
            processes.append(p)
        for p in processes:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"worker exited with code {p.exitcode}")
    losses = dict(queue.get() for _ in range(world_size))
    mean = sum(losses[r] for r in range(world_size)) / world_size
    print(f"final loss {mean!r}")


if __name__ == "__main__":
    main()
