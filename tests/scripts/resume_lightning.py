"""A Lightning script that checkpoints every K steps and resumes with `ckpt_path`.

`L.seed_everything(0)`, a `LightningModule` (an MLP with dropout, Adam), a shuffled
DataLoader over a 40-row TensorDataset (batches of 8: 5 batches an epoch),
`ModelCheckpoint(dirpath="ckpts", every_n_train_steps=K, save_top_k=-1, filename="{step}")`
and `Trainer(max_steps=N).fit(model, loader, ckpt_path=...)`. Checkpoints are written to
`ckpts/step=4.ckpt`, `ckpts/step=8.ckpt`, ... (relative to the working directory).

Resume for `reprocheck resume --at 4`: `--with "--ckpt-path ckpts/step=4.ckpt"` (saves at
steps 4, 8, 12 by default; `--save-every K` changes that).

`--dropout P` sets the dropout (default 0.2); `--no-shuffle` turns the shuffle off;
`--print-batches` prints the row ids of each step's batch.

Measured (lightning 2.6.6, torch 2.13 CPU, one thread; run to 12 vs run to K, then
`--ckpt-path ckpts/step=K.ckpt` to 12; final weights compared bitwise). The checkpoint has
no RNG state (keys: epoch, global_step, state_dict, loops, callbacks, optimizer_states,
lr_schedulers, hparams, version): Lightning does not restore the global RNG, and the
resumed run's generator is where `seed_everything(0)` and the model's init left it.
  - K=4, dropout 0.2: differs (dropout masks, and the data order below).
  - K=4, `--dropout 0`: differs. The DataLoader is not resumable, so Lightning (it warns)
    counts 4 of the epoch's 5 batches as done and draws one batch from a fresh iterator:
    step 5 gets the straight run's step-1 batch instead of its step-5 batch (the fresh
    permutation is drawn from the same generator state as epoch 1's). Steps 6-12 then
    see the straight run's batches (with no dropout both runs draw epoch 2's permutation
    second), but the weights already differ.
  - K=5 (an epoch's end), `--dropout 0`: differs: epoch 2 reshuffles from the unrestored
    generator and repeats epoch 1's order. With dropout 0.2: differs.
  - `--no-shuffle --dropout 0`: K=5 identical; K=4 differs (step 5 replays batch 1).
    `--no-shuffle` with dropout 0.2, K=5: differs.
"""

import argparse
import hashlib

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self, dropout: float = 0.2, lr: float = 1e-2, print_batches: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(10, 32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(32, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        if self.hparams.print_batches:
            print(f"step {self.global_step + 1} batch {ids.tolist()}")
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def make_dataset(rows: int = 40, features: int = 10) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(rows, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    y = x @ w + 0.1 * torch.randn(rows, 1, generator=generator)
    return TensorDataset(x, y, torch.arange(rows))


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--print-batches", action="store_true")
    parser.add_argument("--no-shuffle", action="store_true")
    args = parser.parse_args()

    L.seed_everything(0)
    loader = DataLoader(make_dataset(), batch_size=8, shuffle=not args.no_shuffle)
    model = Regressor(dropout=args.dropout, print_batches=args.print_batches)
    checkpoint = ModelCheckpoint(
        dirpath="ckpts",
        filename="{step}",
        every_n_train_steps=args.save_every,
        save_top_k=-1,
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, loader, ckpt_path=args.ckpt_path)
    print(f"weights {digest(model)}")
    print(f"final loss {trainer.callback_metrics['train_loss'].item()!r}")


if __name__ == "__main__":
    main()
