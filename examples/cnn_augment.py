"""A CNN on synthetic images with NumPy augmentation in the Dataset and DataLoader workers.

python examples/cnn_augment.py --epochs 1 --workers 2
"""

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Shapes(Dataset):
    """Squares in one of four corners, with random flips and noise (NumPy)."""

    def __init__(self, n: int, size: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 4, n)
        self.size = size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = int(self.labels[i])
        image = np.zeros((1, self.size, self.size), dtype=np.float32)
        half = self.size // 2
        row, col = divmod(label, 2)
        image[:, row * half : row * half + 5, col * half : col * half + 5] = 1.0
        if np.random.rand() < 0.5:  # augmentation from NumPy's global generator
            image = image[:, :, ::-1].copy()
        image += 0.1 * np.random.randn(*image.shape).astype(np.float32)
        return torch.from_numpy(image), label


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(64, 4)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    loader = DataLoader(
        Shapes(args.n, seed=args.seed), batch_size=32, shuffle=True, num_workers=args.workers
    )
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        for step, (images, labels) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 4 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
