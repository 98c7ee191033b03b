"""A real nondeterministic op on CPU, not planted noise.

Reading a table with many repeated indices (``table[idx]``) is fine forward; backward
accumulates the gradient rows through ``index_put_(accumulate=True)``, and with more
than one thread the order of those float additions varies from run to run (seen on
torch 2.13: every run a different gradient). ``use_deterministic_algorithms(True)`` or
one thread makes it repeatable.
"""

from __future__ import annotations

import torch
from torch import nn


class TableLookup(nn.Module):
    """Token ids → rows of a small table (many repeats), weighted by position, → classes."""

    def __init__(self, vocab: int = 16, dim: int = 32, seq_len: int = 256, classes: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, dim) * 0.1)
        self.position = nn.Parameter(torch.randn(seq_len, dim) * 0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        vectors = self.table[idx]  # backward: index_put_(accumulate=True) over repeated rows
        return self.head((vectors * self.position).mean(dim=1))


def table_lookup(vocab: int = 16, dim: int = 32, seq_len: int = 256, classes: int = 4) -> nn.Module:
    return TableLookup(vocab, dim, seq_len, classes)
