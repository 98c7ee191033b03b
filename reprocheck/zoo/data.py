"""Synthetic data sets made from the config's seed: the same seed, the same bytes."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification(
    n: int = 512, features: int = 32, classes: int = 4, seed: int = 0
) -> TensorDataset:
    """Gaussian inputs, labels from a fixed random linear teacher (learnable)."""
    g = _generator(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def images(
    n: int = 256, channels: int = 3, size: int = 16, classes: int = 4, seed: int = 0
) -> TensorDataset:
    """Images with a class-dependent bright square on noise."""
    g = _generator(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, channels, size, size, generator=g)
    patch = size // 4
    for label in range(classes):
        row, col = divmod(label, 2)
        x[y == label, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 2.0
    return TensorDataset(x, y)


def sequences(
    n: int = 512, seq_len: int = 16, vocab: int = 64, classes: int = 4, seed: int = 0
) -> TensorDataset:
    """Token sequences labelled by which quarter of the vocabulary is most frequent."""
    g = _generator(seed)
    tokens = torch.randint(0, vocab, (n, seq_len), generator=g)
    bucket = tokens * classes // vocab
    counts = torch.stack([(bucket == c).sum(dim=1) for c in range(classes)], dim=1)
    return TensorDataset(tokens, counts.argmax(dim=1))


def regression(n: int = 512, features: int = 8, seed: int = 0) -> TensorDataset:
    """y = sin(x·w) + noise, one output."""
    g = _generator(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, generator=g)
    return TensorDataset(x, torch.sin(x @ w).unsqueeze(1) + 0.05 * torch.randn(n, 1, generator=g))
