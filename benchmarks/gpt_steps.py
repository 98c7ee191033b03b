"""A GPT-shaped training script that times its own steps (bench_script_hooks.py runs it
plain and under ``reprocheck exec``): token embedding, pre-norm blocks of causal attention
and a GELU MLP, a weight-tied head, AdamW with decay and no-decay groups, gradient
clipping — the shape of the scripts users audit. Each step's wall time, taken around the
whole step (forward, backward, clip, optimizer step), is appended to ``--times`` as JSON
lines; start-up is never in them.

    python benchmarks/gpt_steps.py --width 384 --layers 6 --steps 12 --times t.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, CONTEXT = 256, 128


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, width), nn.Embedding(CONTEXT, width)
        self.blocks = nn.ModuleList(Block(width, max(1, width // 64)) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.tokens.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--times", required=True)
    args = parser.parse_args()
    torch.manual_seed(1337)
    model = GPT(args.width, args.layers)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
    )
    data = torch.randint(0, VOCAB, (4096,))
    with open(args.times, "a", encoding="utf-8") as out:
        for _ in range(args.steps):
            began = time.perf_counter()
            starts = torch.randint(0, len(data) - CONTEXT - 1, (args.batch,))
            x = torch.stack([data[s : s + CONTEXT] for s in starts])
            y = torch.stack([data[s + 1 : s + 1 + CONTEXT] for s in starts])
            loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            out.write(json.dumps(time.perf_counter() - began) + "\n")
            out.flush()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params} parameters, last loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
