"""A one-block character GPT trained the way karpathy/nanoGPT train.py (+ model.py) trains.

Shape: module-level config globals overridden by ``--key=value`` (configurator writing into
``globals()``), ``torch.manual_seed(1337)``, uint16 numpy data, ``get_batch`` with
``torch.randint`` + ``torch.stack(torch.from_numpy(...))``, causal SDPA attention, GELU MLP,
weight-tied lm_head, ``configure_optimizers`` (AdamW decay/no-decay groups), warmup+cosine
``get_lr`` written into each param_group, ``@torch.no_grad() estimate_loss``, a disabled
GradScaler, accumulation micro-steps, ``unscale_`` + ``clip_grad_norm_``, ``torch.save``
checkpoints into ``out_dir`` and ``--init_from=resume`` from them (model, optimizer, iter_num
and best_val_loss restored, as nanoGPT does — not the generators ``get_batch`` draws from:
``reprocheck resume --at 5 --with "--init_from=resume" -- python nanogpt_style.py
--out_dir=out`` names them). Exercises LR writes, accumulation, eval batches drawn from the
same global RNG between updates, and checkpoint writes. No Python/NumPy global RNG is used.
"""

import argparse
import atexit
import contextlib
import math
import os
import shutil
import tempfile
from ast import literal_eval

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------- default config
out_dir = ""  # '' -> tempfile.mkdtemp(), removed at exit
init_from = "scratch"  # or "resume": from out_dir/ckpt.pt
eval_interval, eval_iters, always_save_checkpoint = 5, 2, True
gradient_accumulation_steps, batch_size, block_size = 2, 4, 16
n_layer, n_head, n_embd, dropout, bias = 1, 2, 16, 0.0, False
learning_rate, max_iters, weight_decay, beta1, beta2, grad_clip = 1e-2, 10, 1e-1, 0.9, 0.95, 1.0
decay_lr, warmup_iters, lr_decay_iters, min_lr = True, 3, 10, 1e-3
device, dtype = "cpu", "float32"
compile = False  # nanoGPT: torch.compile the model after building its optimizer
# ----------------------------------------------------------------- configurator
config_keys = [
    k
    for k, v in globals().items()
    if not k.startswith("_") and isinstance(v, (int, float, bool, str))
]
_parser = argparse.ArgumentParser(description="nanoGPT-style training; override with --key=value")
for _k in config_keys:
    _parser.add_argument("--" + _k, type=str, default=None)
for _k, _v in vars(_parser.parse_args()).items():
    if _v is not None:
        with contextlib.suppress(SyntaxError, ValueError):
            _v = literal_eval(_v)  # a plain string stays a string
        assert type(_v) is type(globals()[_k]), f"type mismatch for {_k}"
        globals()[_k] = _v
config = {k: globals()[k] for k in config_keys}
# ---------------------------------------------------------------------------------
if not out_dir:
    out_dir = tempfile.mkdtemp(prefix="nanogpt_style_")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(1337)
torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT; no effect on CPU
device_type = "cuda" if "cuda" in device else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = (
    contextlib.nullcontext()
    if device_type == "cpu"
    else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
)
print(f"tokens per iteration will be: {gradient_accumulation_steps * batch_size * block_size}")

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First "
    "Citizen: You are all resolved rather to die than to famish? All: Resolved.\n"
) * 4
chars = sorted(set(TEXT))
stoi = {ch: i for i, ch in enumerate(chars)}
data = np.array([stoi[c] for c in TEXT], dtype=np.uint16)
n = int(0.9 * len(data))
train_data, val_data = data[:n], data[n:]


def get_batch(split):
    data = train_data if split == "train" else val_data
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack(
        [torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix]
    )
    return x.to(device), y.to(device)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=bias), nn.LayerNorm(n_embd, bias=bias)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def attn(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(n_embd, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout if self.training else 0, is_causal=True
        )
        return self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block() for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits[:, [-1], :], None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        extra_args = dict(fused=True) if device_type == "cuda" else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=len(chars))
iter_num, best_val_loss = 0, 1e9
model = GPT(len(chars)).to(device)
if init_from == "resume":
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location=device)
    model.load_state_dict(checkpoint["model"])
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == "resume":
    optimizer.load_state_dict(checkpoint["optimizer"])
checkpoint = None  # free up memory
if compile:
    print("compiling the model...")
    unoptimized_model = model
    model = torch.compile(model)


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                _logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


X, Y = get_batch("train")
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % eval_interval == 0:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if losses["val"] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses["val"]
            if iter_num > 0:
                checkpoint = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "model_args": model_args,
                    "iter_num": iter_num,
                    "best_val_loss": best_val_loss,
                    "config": config,
                }
                print(f"saving checkpoint to {out_dir}")
                torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    for _micro_step in range(gradient_accumulation_steps):
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps
        X, Y = get_batch("train")  # prefetch the next batch, as nanoGPT does
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lossf = loss.item() * gradient_accumulation_steps
    print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}")
    iter_num += 1
    if iter_num > max_iters:
        break
print(f"final loss {lossf!r}")
