"""Character-level name model trained and sampled the way karpathy/makemore makemore.py does.

Shape: argparse ``--seed 3407``, ``torch.manual_seed`` + ``cuda.manual_seed_all``, a
``CharDataset`` (stoi from ``sorted(set(...))``), ``torch.randperm`` train/test split, an
``InfiniteDataLoader`` over ``RandomSampler(replacement=True, num_samples=int(1e10))``,
``forward(idx, targets=None) -> (logits, loss)``, AdamW(betas=(0.9, 0.99), eps=1e-8),
``@torch.inference_mode() evaluate`` with shuffled loaders every few steps, the best
state_dict saved with ``torch.save`` and reloaded into a second model that samples names
with ``torch.multinomial``. No Python/NumPy global RNG is used.
"""

import argparse
import os
import shutil
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

NAMES = """emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail emily
elizabeth mila ella avery sofia camila aria scarlett victoria madison luna grace chloe penelope
layla riley zoey nora lily eleanor hannah lillian addison aubrey ellie stella natalie zoe leah
hazel violet aurora savannah audrey brooklyn bella claire skylar lucy paisley everly anna
caroline nova genesis emilia kennedy""".split()  # noqa: SIM905


class CharDataset(Dataset):
    def __init__(self, words, chars, max_word_length):
        self.words, self.max_word_length = words, max_word_length
        self.stoi = {ch: i + 1 for i, ch in enumerate(chars)}  # 0 is the start/end token
        self.itos = {i: s for s, i in self.stoi.items()}

    def __len__(self):
        return len(self.words)

    def decode(self, ix):
        return "".join(self.itos[i] for i in ix)

    def __getitem__(self, idx):
        ix = torch.tensor([self.stoi[w] for w in self.words[idx]], dtype=torch.long)
        x = torch.zeros(self.max_word_length + 1, dtype=torch.long)
        y = torch.zeros(self.max_word_length + 1, dtype=torch.long)
        x[1 : 1 + len(ix)] = ix
        y[: len(ix)] = ix
        y[len(ix) + 1 :] = -1  # mask the loss past the end token
        return x, y


class InfiniteDataLoader:
    def __init__(self, dataset, **kwargs):
        train_sampler = torch.utils.data.RandomSampler(
            dataset, replacement=True, num_samples=int(1e10)
        )
        self.train_loader = DataLoader(dataset, sampler=train_sampler, **kwargs)
        self.data_iter = iter(self.train_loader)

    def next(self):
        try:
            batch = next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.train_loader)
            batch = next(self.data_iter)
        return batch


class MLP(nn.Module):  # makemore's Bengio-style MLP over the previous block_size chars
    def __init__(self, vocab_size, block_size, n_embd=8, n_hidden=32):
        super().__init__()
        self.block_size, self.vocab_size = block_size, vocab_size
        self.wte = nn.Embedding(vocab_size + 1, n_embd)  # the extra token is "before the start"
        self.mlp = nn.Sequential(
            nn.Linear(block_size * n_embd, n_hidden), nn.Tanh(), nn.Linear(n_hidden, vocab_size)
        )

    def forward(self, idx, targets=None):
        embs = []
        for _ in range(self.block_size):
            embs.append(self.wte(idx))
            idx = torch.roll(idx, 1, 1)
            idx[:, 0] = self.vocab_size
        logits = self.mlp(torch.cat(embs, -1))
        loss = (
            None
            if targets is None
            else F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        )
        return logits, loss


@torch.inference_mode()
def evaluate(model, dataset, batch_size=16, max_batches=None):
    model.eval()
    loader = DataLoader(dataset, shuffle=True, batch_size=batch_size, num_workers=0)
    losses = []
    for i, (X, Y) in enumerate(loader):
        _logits, loss = model(X, Y)
        losses.append(loss.item())
        if max_batches is not None and i >= max_batches:
            break
    model.train()
    return torch.tensor(losses).mean().item()


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0):
    for _ in range(max_new_tokens):
        logits, _ = model(idx)
        probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="makemore-style name model")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument(
        "--work-dir", type=str, default="", help="default: a temp dir, removed at exit"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="makemore_style_")
    os.makedirs(work_dir, exist_ok=True)

    chars = sorted(set("".join(NAMES)))
    max_word_length = max(len(w) for w in NAMES)
    rp = torch.randperm(len(NAMES)).tolist()
    test_set_size = int(len(NAMES) * 0.1)
    train_dataset = CharDataset([NAMES[i] for i in rp[:-test_set_size]], chars, max_word_length)
    test_dataset = CharDataset([NAMES[i] for i in rp[-test_set_size:]], chars, max_word_length)
    vocab_size = len(chars) + 1

    model = MLP(vocab_size, block_size=3)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8
    )
    batch_loader = InfiniteDataLoader(
        train_dataset, batch_size=args.batch_size, pin_memory=False, num_workers=args.num_workers
    )

    best_loss, step = None, 0
    while True:
        batch = batch_loader.next()
        X, Y = batch
        logits, loss = model(X, Y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step} | loss {loss.item():.4f}")
        if step > 0 and step % 4 == 0:
            train_loss = evaluate(model, train_dataset, batch_size=16, max_batches=2)
            test_loss = evaluate(model, test_dataset, batch_size=16, max_batches=2)
            print(f"step {step} train loss: {train_loss} test loss: {test_loss}")
            if best_loss is None or test_loss < best_loss:
                torch.save(model.state_dict(), os.path.join(work_dir, "model.pt"))
                best_loss = test_loss
        step += 1
        if args.max_steps >= 0 and step >= args.max_steps:
            break

    best = MLP(vocab_size, block_size=3)
    best.load_state_dict(torch.load(os.path.join(work_dir, "model.pt")))
    X_init = torch.zeros(4, 1, dtype=torch.long)
    samples = generate(best, X_init, max_word_length, temperature=1.0)
    for row in samples[:, 1:].tolist():
        row = row[: row.index(0)] if 0 in row else row
        print("sample:", train_dataset.decode(row))
    final = evaluate(best, test_dataset, batch_size=16)
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"final loss {final!r}")
