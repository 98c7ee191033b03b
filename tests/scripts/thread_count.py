"""A regression whose bits depend on torch's intra-op thread count.

Shape: a plain full-batch loop on a wide linear layer, the kind of script that leaves the
thread count to `OMP_NUM_THREADS`. The loss is a mean over 1M outputs and the gradient a
512×512 matrix product: torch splits both across its threads, so one thread and two
threads sum in a different order and give different bits, run after run the same for
each count.

``--numpy-features``: the inputs are a NumPy float32 matrix product first (a feature
projection done in NumPy, as data-preparation code often is): NumPy's OpenBLAS splits it
across the threads `OMP_NUM_THREADS` gave it when NumPy loaded, so its bits depend on the
count as well.
"""

import argparse

import numpy as np
import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--numpy-features", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2048, 512)
    if args.numpy_features:
        rng = np.random.default_rng(0)
        projection = rng.standard_normal((512, 512)).astype(np.float32) / 512**0.5
        x = torch.from_numpy(x.numpy() @ projection)
    for step in range(args.steps):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item()!r} threads {torch.get_num_threads()}")
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
