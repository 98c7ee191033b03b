"""A character-level language model whose vocabulary comes from a `set`, unsorted.

Shape: the character-level prepare-and-train scripts (nanoGPT's `shakespeare_char`,
makemore) — text in, `chars = …set(text)…`, `stoi`/`itos`, the text encoded into one long
tensor, random blocks drawn with `torch.randint`, a small embedding + MLP model, AdamW. The
script seeds torch itself. Its one slip: the vocabulary is `list(set(text))`, not
`sorted(set(text))`, so each character's id follows the string hash — which changes with
every interpreter unless PYTHONHASHSEED is fixed. Under `--preset none` (PYTHONHASHSEED
left unset) the runs encode the text differently; `--sorted` repeats under any preset.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

TEXT = (
    "first citizen: before we proceed any further, hear me speak. "
    "all: speak, speak. first citizen: you are all resolved rather to die than to famish? "
    "all: resolved. resolved. first citizen: first, you know caius marcius is chief enemy "
    "to the people. all: we know't, we know't. first citizen: let us kill him, and we'll "
    "have corn at our own price. is't a verdict? all: no more talking on't; let it be done."
)


class CharMLP(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.net = nn.Sequential(
            nn.Linear(block * dim, hidden), nn.Tanh(), nn.Linear(hidden, vocab)
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(idx).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--sorted", action="store_true", help="sorted(set(text)): the fix")
    args = parser.parse_args()

    chars = sorted(set(TEXT)) if args.sorted else list(set(TEXT))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in TEXT], dtype=torch.long)

    torch.manual_seed(1337)
    model = CharMLP(len(chars), args.block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.steps):
        ix = torch.randint(len(data) - args.block, (32,))
        x = torch.stack([data[i : i + args.block] for i in ix])
        y = torch.stack([data[i + args.block] for i in ix])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"final loss {loss.item()!r}")


if __name__ == "__main__":
    main()
