"""A training script whose backward is nondeterministic on CPU with 2 threads.

Shape: a bag-of-tokens classifier trained the plain way (a model class, a DataLoader over
a TensorDataset, Adam, `loss.backward()`, `optimizer.step()`), whose forward reads an
embedding table by advanced indexing — `self.table[tokens]` with many repeated ids. Its
backward accumulates rows through `index_put_(accumulate=True)`, which with more than one
thread sums in a run-dependent order (torch 2.13, CPU). `--threads 1` in the audit, or
`torch.use_deterministic_algorithms(True)`, makes it repeat. `--set-threads N` calls
`torch.set_num_threads(N)` itself, as many scripts do: an audit's one-thread control is then
overridden. `--workers N` loads the batches in N DataLoader worker processes (the zoom
still names `index_put`, not the ops that unpickle the workers' batches).
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TokenTable(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32, length: int = 256, classes: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, dim) * 0.1)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table[tokens]  # many repeated ids: backward accumulates through index_put_
        return self.head((rows * self.position).mean(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set-threads", type=int, help="the script's own thread count")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    if args.set_threads:
        torch.set_num_threads(args.set_threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, 16, (64, 256))
    labels = torch.randint(0, 4, (64,))
    loader = DataLoader(
        TensorDataset(tokens, labels), batch_size=16, shuffle=False, num_workers=args.workers
    )
    model = TokenTable()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == args.steps:
            break
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
