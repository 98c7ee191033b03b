"""A Lightning training script, written the way Lightning's own examples are.

Shape: `L.seed_everything(...)` first, a `LightningModule` with `training_step` that calls
`self.log(...)` (a loss and a torchmetrics metric: metrics define `__hash__` from their
state, which broke hooks that hashed modules under construction), `configure_optimizers`,
a DataLoader over a TensorDataset, `L.Trainer(...).fit(model, loader)`.

`--table` trains a bag-of-tokens model that reads an embedding table by advanced indexing
(`self.table[tokens]`): its backward accumulates through `index_put_`, nondeterministic on
CPU with 2 threads. `--deterministic false|true|warn` passes `Trainer(deterministic=…)`;
Lightning then calls `torch.use_deterministic_algorithms` itself. `--workers N` loads
batches in N DataLoader workers; `--accumulate K` steps the optimizer every K batches.
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
        self.mae = torchmetrics.MeanAbsoluteError()

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self.net(x)
        loss = F.mse_loss(pred, y)
        self.mae(pred, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_mae", self.mae, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TokenTable(L.LightningModule):
    def __init__(self, vocab: int = 16, dim: int = 32, length: int = 256, classes: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, dim) * 0.1)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.1)
        self.head = nn.Linear(dim, classes)
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=classes)

    def forward(self, tokens):
        rows = self.table[tokens]  # repeated ids: backward accumulates through index_put_
        return self.head((rows * self.position).mean(dim=1))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits, labels)
        self.accuracy(logits, labels)
        self.log("train_loss", loss)
        self.log("train_acc", self.accuracy)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--deterministic", default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()

    L.seed_everything(42, workers=True)
    if args.table:
        data = TensorDataset(torch.randint(0, 16, (64, 256)), torch.randint(0, 4, (64,)))
        model = TokenTable()
    else:
        x = torch.randn(128, 8)
        data = TensorDataset(x, x.sum(1, keepdim=True))
        model = Regressor()
    loader = DataLoader(
        data,
        batch_size=16,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    deterministic = {None: None, "true": True, "false": False}.get(
        args.deterministic, args.deterministic
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        deterministic=deterministic,
        accumulate_grad_batches=args.accumulate,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    print(f"final loss {trainer.callback_metrics['train_loss'].item()!r}")


if __name__ == "__main__":
    main()
