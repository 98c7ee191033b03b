"""A transformers `Trainer` script that saves checkpoints and resumes from one.

A one-layer BERT built from a `BertConfig` (nothing downloaded; its dropout left on), a
Dataset of 40 padded token-id rows with labels (batches of 8: 5 batches an epoch),
`TrainingArguments(output_dir="out", max_steps=N, save_strategy="steps", save_steps=K,
seed=0)` and `trainer.train(resume_from_checkpoint=...)`. Checkpoints go to `out/checkpoint-4`,
`out/checkpoint-8`, ... (relative to the working directory).

Resume for `reprocheck resume --at 4`: `--with "--resume out/checkpoint-4"` or
`--with "--resume true"` (the latest checkpoint in `out/`). Saves at steps 4, 8, 12 by
default (`--save-every K`).

`--dropout P` sets BERT's hidden and attention dropout (default 0.1, the config's own);
`--print-batches` prints the row ids of each batch as the collator builds it (accelerate's
loader fetches one batch ahead, so a line runs one step early).

Measured (transformers 5.25, torch 2.13 CPU, one thread; a run to 12 vs a run to 12
stopped right after its first save, then `--resume out/checkpoint-K` to 12; final weights
compared bitwise):
  - dropout 0.1, K=4 (also `--resume true`), K=3, K=5 (an epoch's end): identical. The
    checkpoint holds rng_state.pth, optimizer, scheduler and trainer_state; the Trainer
    skips the epoch's used batches and the data order matches (checked with
    `--print-batches`). `--dropout 0`, K=4: identical.
  - A run made with `--steps 4` instead (max_steps=4) then resumed to 12 differs: the
    linear lr schedule is built from max_steps, and the checkpoint's optimizer carries
    lr 0 into the first resumed step. Stop the 12-step run instead of shortening it.
"""

import argparse
import hashlib

import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)


class Tokens(Dataset):
    def __init__(self, count: int = 40, length: int = 12, vocab: int = 64):
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(1, vocab, (count, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
        self.mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        self.ids = ids * self.mask
        self.labels = torch.randint(0, 2, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "row": index,
            "input_ids": self.ids[index],
            "attention_mask": self.mask[index],
            "labels": self.labels[index],
        }


class Collator:
    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def __call__(self, items: list) -> dict:
        rows = [item.pop("row") for item in items]
        if self.verbose:
            print(f"batch {rows}")
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or `true`")
    parser.add_argument("--dropout", type=float, default=0.1, help="BERT's two dropouts")
    parser.add_argument("--print-batches", action="store_true")
    args = parser.parse_args()

    resume = args.resume
    if resume is not None and resume.lower() == "true":
        resume = True

    set_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
    )
    model = BertForSequenceClassification(config)
    training = TrainingArguments(
        output_dir="out",
        max_steps=args.steps,
        save_strategy="steps",
        save_steps=args.save_every,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the collator drops "row" itself
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Tokens(),
        data_collator=Collator(args.print_batches),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    print(f"weights {digest(model)}")
    print(f"final loss {result.training_loss!r}")


if __name__ == "__main__":
    main()
