"""Small models that cover the layer types whose numerics matter: linear, conv with
batch-norm and dropout, attention, recurrent."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """in → hidden (× depth, ReLU) → classes."""

    def __init__(self, in_features: int = 32, hidden: int = 64, classes: int = 4, depth: int = 2):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def mlp(in_features: int = 32, hidden: int = 64, classes: int = 4, depth: int = 2) -> nn.Module:
    return MLP(in_features, hidden, classes, depth)


class CNN(nn.Module):
    """Two conv blocks (conv, batch-norm, ReLU, max-pool), dropout, linear head."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 4, dropout: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.dropout = nn.Dropout(dropout)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.dropout(torch.flatten(self.pool(x), 1))
        return self.fc(x)


def cnn(channels: int = 3, width: int = 8, classes: int = 4, dropout: float = 0.1) -> nn.Module:
    return CNN(channels, width, classes, dropout)


class TinyTransformer(nn.Module):
    """Token + position embeddings, pre-norm encoder layers, mean-pooled classifier."""

    def __init__(
        self,
        vocab: int = 64,
        seq_len: int = 16,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        classes: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(seq_len, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.norm(self.encoder(x))
        return self.head(x.mean(dim=1))


def transformer(
    vocab: int = 64,
    seq_len: int = 16,
    dim: int = 32,
    heads: int = 4,
    layers: int = 2,
    classes: int = 4,
    dropout: float = 0.1,
) -> nn.Module:
    return TinyTransformer(vocab, seq_len, dim, heads, layers, classes, dropout)


class LSTMClassifier(nn.Module):
    """Embedding, a 2-layer LSTM, the last hidden state to a classifier."""

    def __init__(
        self, vocab: int = 64, dim: int = 32, hidden: int = 48, layers: int = 2, classes: int = 4
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def lstm(
    vocab: int = 64, dim: int = 32, hidden: int = 48, layers: int = 2, classes: int = 4
) -> nn.Module:
    return LSTMClassifier(vocab, dim, hidden, layers, classes)
