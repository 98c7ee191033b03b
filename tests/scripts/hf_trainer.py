"""A transformers `Trainer` fine-tuning script, in the shape of the library's text
classification examples, on a tiny BERT built from a config (nothing downloaded).

`set_seed` is the Trainer's own (`TrainingArguments(seed=...)`); `--late-seed` builds the
model *before* anything seeds it, as scripts do that create the model first and let
`TrainingArguments(seed=…)` seed afterwards. `--workers N` loads batches in N DataLoader
workers, `--accumulate K` accumulates K batches per optimizer step.
"""

import argparse

import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)


class Sentences(Dataset):
    """Token ids with a padded tail and a label: what a tokenizer would have produced."""

    def __init__(self, count: int = 64, length: int = 16, vocab: int = 50):
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(1, vocab, (count, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
        self.mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # 0 is [PAD]
        self.labels = torch.randint(0, 2, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "input_ids": self.ids[index],
            "attention_mask": self.mask[index],
            "labels": self.labels[index],
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="hf-out")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--late-seed", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()

    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    if not args.late_seed:
        set_seed(42)
    model = BertForSequenceClassification(config)
    training = TrainingArguments(
        output_dir=args.output_dir,
        seed=42,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accumulate,
        learning_rate=1e-3,
        dataloader_num_workers=args.workers,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=Sentences())
    result = trainer.train()
    print(f"final loss {result.training_loss!r}")


if __name__ == "__main__":
    main()
