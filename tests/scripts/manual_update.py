"""Tiny LSTM language model trained with a hand-written SGD update (no torch.optim).

Shape: pytorch/examples word_language_model/main.py -- ``torch.manual_seed(args.seed)``,
a corpus tokenised into a LongTensor, ``batchify``, ``get_batch(source, i)`` with bptt,
Embedding -> LSTM -> Linear, ``repackage_hidden``, ``model.zero_grad()``,
``clip_grad_norm_`` and the update ``p.data.add_(p.grad, alpha=-lr)``, then an eval pass.

Exercises: parameter updates that bypass any optimizer (``.data`` in-place or, with
``--no-grad-update``, under ``torch.no_grad()``), gradient accumulation (``--accumulate``),
and planted nondeterminism from a time-seeded generator (``--noise-from K``).
"""

import argparse
import time

import torch
import torch.nn as nn

TEXT = (
    "the quick brown fox jumps over the lazy dog and the dog sleeps while the fox "
    "runs over the hill to the river where the quick fish swim under the old bridge "
    "and the lazy cat watches the fish from the bridge while the sun goes down"
)

parser = argparse.ArgumentParser(description="tiny LSTM language model, manual SGD")
parser.add_argument("--emsize", type=int, default=16)
parser.add_argument("--nhid", type=int, default=16)
parser.add_argument("--lr", type=float, default=2.0)
parser.add_argument("--clip", type=float, default=0.25)
parser.add_argument("--batch_size", type=int, default=4)
parser.add_argument("--bptt", type=int, default=6)
parser.add_argument("--dropout", type=float, default=0.0)
parser.add_argument("--seed", type=int, default=1111)
parser.add_argument("--updates", type=int, default=12, help="stop after N updates")
parser.add_argument("--accumulate", type=int, default=1, help="forward/backward passes per update")
parser.add_argument("--no-grad-update", action="store_true", help="update under torch.no_grad()")
parser.add_argument(
    "--noise-from", type=int, default=0, help="add time-seeded noise from update K on"
)
parser.add_argument(
    "--eval-in-train-mode", action="store_true", help="evaluate without model.eval() (a slip)"
)
args = parser.parse_args()

torch.manual_seed(args.seed)
noise_gen = torch.Generator().manual_seed(time.time_ns() % 2**31)

words = TEXT.split()
vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
corpus = torch.tensor([vocab[w] for w in words], dtype=torch.long)
split = int(len(corpus) * 0.8)


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


train_data = batchify(corpus[:split], args.batch_size)
val_data = batchify(corpus[split:], 2)


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, 1)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(1, bsz, self.nhid), weight.new_zeros(1, bsz, self.nhid))


ntokens = len(vocab)
model = RNNModel(ntokens, args.emsize, args.nhid, args.dropout)
criterion = nn.CrossEntropyLoss()


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def evaluate(data_source):
    if not args.eval_in_train_mode:
        model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(data_source.size(1))
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            total_loss += len(data) * criterion(output.view(-1, ntokens), targets).item()
            hidden = repackage_hidden(hidden)
    return total_loss / (len(data_source) - 1)


lr = args.lr
updates = passes = 0
model.train()
hidden = model.init_hidden(args.batch_size)
model.zero_grad()
while updates < args.updates:
    for i in range(0, train_data.size(0) - 1, args.bptt):
        data, targets = get_batch(train_data, i)
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output.view(-1, ntokens), targets)
        loss.backward()
        passes += 1
        if passes % args.accumulate:
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        updates += 1
        noisy = args.noise_from > 0 and updates >= args.noise_from
        for p in model.parameters():
            if args.no_grad_update:
                with torch.no_grad():
                    p.add_(p.grad, alpha=-lr)
                    if noisy:
                        p.add_(torch.randn(p.shape, generator=noise_gen) * 1e-3)
            else:
                p.data.add_(p.grad, alpha=-lr)
                if noisy:
                    p.data.add_(torch.randn(p.shape, generator=noise_gen) * 1e-3)
        model.zero_grad()
        print(f"| update {updates:3d} | lr {lr:.2f} | loss {loss.item():.4f}")
        if updates >= args.updates:
            break
    hidden = model.init_hidden(args.batch_size)

val_loss = evaluate(val_data)
print(f"| end of training | valid loss {val_loss:.4f}")
print(f"final loss {val_loss!r}")
