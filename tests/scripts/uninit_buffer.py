"""A two-branch model that concatenates into a buffer from `torch.empty` and fills it short.

Shape: feature-fusion code that preallocates its output — `out = torch.empty(n, a + b)`,
then `out[:, :a] = left(x)`, `out[:, a:] = right(x)` — here with the right branch one
column narrower than the buffer (a width changed in one place only), so the last column is
never written and the head reads uninitialized memory. Whether two runs on one machine agree
depends on what the allocator left there; the doctor's probe (deterministic algorithms on,
uninitialized memory filled with NaN vs left as is) names it on any machine. `--zeros`
allocates with `torch.zeros`: the fix.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


class Fusion(nn.Module):
    def __init__(self, dim: int = 12, left: int = 8, right: int = 8, zeros: bool = False):
        super().__init__()
        self.left = nn.Linear(dim, left)
        self.right = nn.Linear(dim, right - 1)  # one narrower than the buffer's share
        self.head = nn.Linear(left + right, 2)
        self.widths = (left, right)
        self.zeros = zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.widths
        allocate = torch.zeros if self.zeros else torch.empty
        out = allocate(x.shape[0], left + right)
        out[:, :left] = self.left(x)
        out[:, left : left + right - 1] = self.right(x)
        return self.head(torch.tanh(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zeros", action="store_true", help="allocate with torch.zeros")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(32, 12)
    y = (x[:, 0] > 0).long()
    model = Fusion(zeros=args.zeros)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
