"""Data-parallel training under ``torchrun`` (gloo, CPU).

Shape: the ``Trainer`` of pytorch/examples ``distributed/ddp-tutorial-series``
(``multigpu_torchrun.py``) -- ``ddp_setup()`` reads the rank from the environment torchrun
sets and calls ``init_process_group``; a ``Trainer`` wraps the model in
``DistributedDataParallel``, runs epochs over a ``DataLoader`` with a
``DistributedSampler`` (``set_epoch`` each epoch), and saves a snapshot from rank 0;
``main()`` builds the dataset, model and optimizer and tears the group down at the end.

    torchrun --standalone --nproc_per_node 2 ddp_train.py [--epochs E] ...

Planted, one option each (the default script reproduces and its replicas agree):
``--sched-rank0``: an LR scheduler stepped on rank 0 only (replicas drift apart, the
gradients still agree); ``--batchnorm --no-broadcast-buffers``: BatchNorm running stats
left unsynced (buffers differ between replicas, parameters agree); ``--dropout P
--entropy-dropout``: every rank re-seeds from entropy before training (runs differ);
``--fail-rank R``: rank R raises at its second step; ``--hang-rank R``: rank R stops at its
second step (the others wait in the all-reduce).
"""

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class RandomRegression(Dataset):
    """Fixed (x, y) pairs, generated once from a seeded generator."""

    def __init__(self, size, generator):
        self.x = torch.randn(size, 12, generator=generator)
        self.y = self.x[:, :3].sum(dim=1, keepdim=True) + 0.1 * torch.randn(
            size, 1, generator=generator
        )

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


class Net(nn.Module):
    def __init__(self, batchnorm, dropout):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.norm = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.norm(self.fc1(x)))))


def ddp_setup():
    dist.init_process_group(backend="gloo")


class Trainer:
    def __init__(self, model, train_data, optimizer, scheduler, args):
        self.rank = int(os.environ["RANK"])
        if args.no_broadcast_buffers:
            self.model = DDP(model, broadcast_buffers=False)  # planted: buffers never synced
        else:
            self.model = DDP(model)
        self.train_data = train_data
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.args = args
        self.steps_run = 0

    def _run_batch(self, source, targets):
        if self.rank == self.args.fail_rank and self.steps_run == 1:
            raise RuntimeError(f"rank {self.rank} lost its data shard")
        if self.rank == self.args.hang_rank and self.steps_run == 1:
            time.sleep(3600)  # planted: the other ranks wait in the all-reduce
        self.optimizer.zero_grad()
        output = self.model(source)
        loss = F.mse_loss(output, targets)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None and self.rank == 0:
            self.scheduler.step()  # planted: only rank 0's learning rate decays
        self.steps_run += 1
        return loss

    def _run_epoch(self, epoch):
        self.train_data.sampler.set_epoch(epoch)
        for source, targets in self.train_data:
            loss = self._run_batch(source, targets)
        return loss

    def _save_snapshot(self, epoch, path):
        snapshot = {"MODEL_STATE": self.model.module.state_dict(), "EPOCHS_RUN": epoch}
        torch.save(snapshot, path)

    def train(self, max_epochs, snapshot_path):
        for epoch in range(max_epochs):
            loss = self._run_epoch(epoch)
            if self.rank == 0:
                self._save_snapshot(epoch, snapshot_path)
        return loss


def load_train_objs(args):
    dataset = RandomRegression(args.size, torch.Generator().manual_seed(args.seed))
    model = Net(args.batchnorm, args.dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5) if args.sched_rank0 else None
    )
    return dataset, model, optimizer, scheduler


def main():
    parser = argparse.ArgumentParser(description="DDP training under torchrun")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--no-broadcast-buffers", action="store_true")
    parser.add_argument("--sched-rank0", action="store_true")
    parser.add_argument("--entropy-dropout", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--hang-rank", type=int, default=-1)
    args = parser.parse_args()

    ddp_setup()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dataset, model, optimizer, scheduler = load_train_objs(args)
    if args.entropy_dropout:
        torch.seed()  # planted: each rank's dropout masks from entropy
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        sampler=DistributedSampler(dataset, seed=args.seed),
    )
    trainer = Trainer(model, loader, optimizer, scheduler, args)
    with tempfile.TemporaryDirectory() as folder:
        loss = trainer.train(args.epochs, os.path.join(folder, "snapshot.pt"))
    if dist.get_rank() == 0:
        print(f"final loss {loss.item()!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
