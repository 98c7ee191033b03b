"""A small regression trained full-batch for many steps, with noise from entropy added to
its output from step K on (``--noise-from K``, scaled by ``--noise-scale``): runs agree up
to K and part after it.

Shape: the plain full-batch loop of a curve-fitting example (pytorch/examples
``regression``-style): fixed ``x, y``, a two-layer Tanh MLP, SGD; nothing else. Used where
many steps are the point (the HTML report's growth plot over 1,000 steps).
"""

import argparse

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--noise-from", type=int, default=-1)
# at 1e-6 the loss may round to the same float32 value while the gradients differ
parser.add_argument("--noise-scale", type=float, default=1e-6)
args = parser.parse_args()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(64, 8), torch.randn(64, 1)
noise = torch.Generator()
noise.seed()
for step in range(args.steps):
    out = model(x)
    if 0 <= args.noise_from <= step:
        out = out + args.noise_scale * torch.randn(out.shape, generator=noise)  # planted
    loss = torch.nn.functional.mse_loss(out, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"final loss {loss.item()!r}")
