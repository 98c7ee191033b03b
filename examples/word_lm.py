"""A word-level language model on a generated corpus: an LSTM predicting the next word.

python examples/word_lm.py --epochs 1
"""

import argparse
import random

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "quickly",
    "slowly",
    "and",
    "then",
]


def make_corpus(n_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        length = rng.randint(4, 9)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)) + " .")
    return " ".join(sentences).split()


class Windows(Dataset):
    def __init__(self, ids: list[int], context: int):
        self.ids = torch.tensor(ids)
        self.context = context

    def __len__(self):
        return len(self.ids) - self.context - 1

    def __getitem__(self, i):
        chunk = self.ids[i : i + self.context + 1]
        return chunk[:-1], chunk[1:]


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.embed(x))
        return self.out(self.drop(h))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    corpus = make_corpus(args.sentences, args.seed)
    vocab = {word: i for i, word in enumerate(sorted(set(corpus)))}
    data = Windows([vocab[w] for w in corpus], context=12)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    model = LanguageModel(len(vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        total = 0.0
        for inputs, targets in loader:
            logits = model(inputs)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"epoch {epoch}: loss {total / len(loader):.4f}")


if __name__ == "__main__":
    main()
