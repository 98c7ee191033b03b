"""A script with a bug people really write: noise from an entropy-seeded generator.

From step --noise-from on, the hidden layer gets noise from a generator seeded with
os.urandom, so two runs of the same seeded script part ways exactly there.

    python examples/noisy_train.py --noise-from 3
"""

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Model(nn.Module):
    def __init__(self, noise_from: int):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 2)
        self.noise_from = noise_from
        self.calls = 0
        self.entropy = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.fc1(x))
        if self.calls >= self.noise_from:
            h = h + 0.01 * torch.randn(h.shape, generator=self.entropy)  # the bug
        return self.fc2(h)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--noise-from", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--crash-at", type=int, default=0, help="raise at this step (0: never)")
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    data = TensorDataset(x, (x.sum(1) > 0).long())
    loader = DataLoader(data, batch_size=32, shuffle=True)
    model = Model(args.noise_from)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    while step < args.steps:
        for inputs, labels in loader:
            step += 1
            if step == args.crash_at:
                raise ValueError(f"bad batch at step {step}")
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {step}: loss {loss.item():.4f}")
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
