"""Polynomial regression with a hand-written update and NO seeding by default.

Shape: pytorch/examples regression/main.py -- a random ground-truth polynomial
``W_target``/``b_target`` drawn with ``torch.randn`` at module level, ``make_features``,
``get_batch`` drawing ``torch.randn``, a single ``torch.nn.Linear``, an
``itertools.count(1)`` loop with ``fc.zero_grad()``, ``F.smooth_l1_loss``, ``backward`` and
``param.data.add_(-0.1 * param.grad)``, stopping once the loss is below 1e-3.

Exercises: a script that, like the original, never seeds torch itself, so two runs
differ (target, init and batches all come from the unseeded global generator; the
printed batch count usually differs too). ``--seed S`` calls ``torch.manual_seed(S)``
before anything is drawn and makes runs identical.
"""

import argparse
from itertools import count

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description="polynomial regression, manual SGD")
parser.add_argument("--seed", type=int, default=None, help="seed torch (default: do not seed)")
parser.add_argument("--max-batches", type=int, default=400, help="stop after this many batches")
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()
if args.seed is not None:
    torch.manual_seed(args.seed)

POLY_DEGREE = 3
W_target = torch.randn(POLY_DEGREE, 1) * 2
b_target = torch.randn(1) * 2


def make_features(x):
    """Columns [x, x^2, ..., x^POLY_DEGREE]."""
    x = x.unsqueeze(1)
    return torch.cat([x**i for i in range(1, POLY_DEGREE + 1)], 1)


def f(x):
    return x.mm(W_target) + b_target.item()


def poly_desc(W, b):
    terms = " ".join(f"{w:+.2f} x^{i + 1}" for i, w in enumerate(W))
    return f"y = {terms} {b[0]:+.2f}"


def get_batch(batch_size=32):
    random = torch.randn(batch_size)
    x = make_features(random)
    return x, f(x)


fc = torch.nn.Linear(W_target.size(0), 1)

for batch_idx in count(1):
    batch_x, batch_y = get_batch(args.batch_size)
    fc.zero_grad()
    output = F.smooth_l1_loss(fc(batch_x), batch_y)
    loss = output.item()
    output.backward()
    for param in fc.parameters():
        param.data.add_(-0.1 * param.grad)
    if loss < 1e-3 or batch_idx >= args.max_batches:
        break

print(f"Loss: {loss:.6f} after {batch_idx} batches")
print("==> Learned function:\t" + poly_desc(fc.weight.view(-1), fc.bias))
print("==> Actual function:\t" + poly_desc(W_target.view(-1), b_target))
print(f"batches {batch_idx}")
print(f"final loss {loss!r}")
