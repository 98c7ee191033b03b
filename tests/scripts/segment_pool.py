"""A small segmentation net whose decoder upsamples bilinearly and whose loss pools by class.

Shape: the dense-prediction training scripts of torchvision's references and of U-Net
repositories — an encoder that downsamples with strided convolutions, a decoder that
restores the size with `F.interpolate(mode="bilinear")`, per-pixel cross-entropy, SGD with
momentum — plus a class-centre term that sums pixel features per class with `index_add_`
(as center-loss and prototype code does). On CPU it reproduces; on CUDA both the bilinear
upsampling's backward and `index_add_` accumulate with atomics: `reprocheck doctor` names
both lines from a CPU run.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


class TinySegNet(nn.Module):
    def __init__(self, classes: int = 3, width: int = 8):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.down(image)
        features = F.interpolate(
            features, size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.head(features), features


def class_centres(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    sums = torch.zeros(classes, features.shape[1]).index_add_(0, labels.reshape(-1), flat)
    counts = torch.bincount(labels.reshape(-1), minlength=classes).clamp(min=1)
    return sums / counts[:, None]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16)
    labels = (images[:, 0] * 3).long().clamp(max=2)
    model = TinySegNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for _ in range(args.steps):
        logits, features = model(images)
        centres = class_centres(features, labels, 3)
        loss = F.cross_entropy(logits, labels) + 0.01 * centres.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
