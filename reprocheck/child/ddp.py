"""A config's training as one rank of a ``torchrun`` job (``distributed:`` in a config).

``reprocheck run`` starts each run as ``torchrun --standalone --nproc_per_node N -m
reprocheck.child.ddp CONFIG``; every rank runs this module under the script hooks, which
record it as they record any script (one trace per rank, replicas checked afterwards).
The model is wrapped in ``DistributedDataParallel``, the config's Dataset split by a
``DistributedSampler`` seeded with the config's seed (``set_epoch`` every epoch), and the
config's optimizer and loss train it for the config's steps. Under an audit the config is
the audited variant's (the script hooks' settings carry it); by hand, the file given.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..config import Config, ConfigError
from ..contract import CHILD_ENV, ChildSettings
from .loop import build_dataset, build_model, build_optimizer, resolve_loss, split_batch, to_device


def _config(path: str) -> Config:
    """The audited variant (from the script hooks' settings) or the config file itself."""
    from ..configfile import config_from_dict, load_config

    settings = os.environ.get(CHILD_ENV)
    config = ChildSettings.imported(settings).config if settings else None
    if config:
        return config_from_dict(config, path=path, base_dir=os.path.dirname(os.path.abspath(path)))
    return load_config(path)


def train(config: Config, backend: str) -> float:
    """This rank's share of the config's steps; returns its last loss."""
    dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(config, device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None
    )
    dataset = build_dataset(config)
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise ConfigError(
            f"distributed: data factory {config.data.factory} must return a Dataset with a "
            "length (a DistributedSampler splits it among the ranks)"
        )
    sampler = DistributedSampler(
        dataset, shuffle=config.data.shuffle, seed=config.seed, drop_last=config.data.drop_last
    )
    loader = DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
        drop_last=config.data.drop_last,
    )
    optimizer = build_optimizer(config, model)
    loss_fn = resolve_loss(config)
    step, epoch, loss = 0, 0, torch.zeros(())
    while step < config.steps:
        sampler.set_epoch(epoch)
        produced = False
        for batch in loader:
            produced = True
            inputs, target = split_batch(to_device(batch, device))
            optimizer.zero_grad()
            loss = loss_fn(ddp(inputs), target)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= config.steps:
                break
        if not produced:
            raise RuntimeError("the data ran out of batches before the last step")
        epoch += 1
    dist.destroy_process_group()
    return float(loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprocheck.child.ddp")
    parser.add_argument("config", help="the config file")
    parser.add_argument("--backend", default=None, help="gloo | nccl (default: the config's)")
    args = parser.parse_args(argv)
    config = _config(args.config)
    backend = args.backend or (config.distributed.backend if config.distributed else "gloo")
    loss = train(config, backend)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final loss {loss!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
