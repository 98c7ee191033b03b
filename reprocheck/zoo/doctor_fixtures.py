"""Fixtures for the doctor: each shows one cause, or the absence of one."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def set_ordered_data(
    n: int = 256, words: int = 40, features: int = 32, seed: int = 0
) -> TensorDataset:
    """Data whose features depend on the iteration order of a set of strings — that is, on
    PYTHONHASHSEED: the kind of bug a vocabulary built with `set()` hides."""
    g = torch.Generator().manual_seed(seed)
    vocabulary = [f"token{i}" for i in range(words)]
    order = list(set(vocabulary))  # the bug: set order follows the per-process string hash
    ids = torch.tensor([order.index(word) for word in vocabulary], dtype=torch.float32)
    picks = torch.randint(0, words, (n, features), generator=g)
    x = ids[picks] / words
    return TensorDataset(x, (x.sum(dim=1) > features / 2).long())


class NoisyDataset(Dataset):
    """Samples with NumPy noise added in ``__getitem__``: reproducible with DataLoader
    workers, because torch seeds NumPy in each worker from the loader's base seed."""

    def __init__(self, n: int = 256, features: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=g)
        self.y = (self.x.sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        noise = torch.from_numpy(np.random.normal(0, 0.1, self.x.shape[1]).astype(np.float32))
        return self.x[index] + noise, self.y[index]


def noisy_dataset(n: int = 256, features: int = 32, seed: int = 0) -> Dataset:
    return NoisyDataset(n, features, seed)


class GpuRisky(nn.Module):
    """Bilinear upsampling and index_add_: deterministic on CPU, not on CUDA."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.conv(x), scale_factor=0.5, mode="bilinear", align_corners=False)
        rows = torch.zeros(8, x.shape[0] * 4, dtype=x.dtype)
        pooled = x.flatten(2).mean(dim=2).reshape(-1)  # (batch × 4,)
        rows = rows.index_add(0, torch.arange(pooled.numel()) % 8, torch.diag(pooled))
        return self.head(rows.t().reshape(x.shape[0], -1))


def gpu_risky(channels: int = 3, classes: int = 4) -> nn.Module:
    return GpuRisky(channels, classes)


def compiled_mlp(in_features: int = 32, classes: int = 4) -> nn.Module:
    """An MLP run through ``torch.compile``: the doctor says so (RC017)."""
    from .models import mlp

    return torch.compile(mlp(in_features=in_features, classes=classes))
