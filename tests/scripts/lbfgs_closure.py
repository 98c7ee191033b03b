"""Two-layer LSTMCell sine predictor trained with LBFGS and a closure, in float64.

Shape: pytorch/examples time_sequence_prediction/train.py -- ``np.random.seed(0)`` and
``torch.manual_seed(0)``, sine-wave data built with numpy, a ``Sequence`` module of two
``nn.LSTMCell`` and a Linear that loops over time steps (plus ``future`` steps),
``.double()``, ``nn.MSELoss``, ``optim.LBFGS(lr=0.8)`` stepped with a ``closure`` that
zeroes grads, computes and prints the loss and calls ``backward``; after every step a
``torch.no_grad()`` prediction on held-out sequences.

Exercises: an optimizer whose ``step`` calls the closure several times (several
forward/backward passes per optimizer step), double precision, and a per-time-step
Python loop in forward.
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim

HIDDEN = 8


class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, HIDDEN)
        self.lstm2 = nn.LSTMCell(HIDDEN, HIDDEN)
        self.linear = nn.Linear(HIDDEN, 1)

    def forward(self, input, future=0):
        outputs = []
        h_t = torch.zeros(input.size(0), HIDDEN, dtype=torch.double)
        c_t = torch.zeros(input.size(0), HIDDEN, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), HIDDEN, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), HIDDEN, dtype=torch.double)
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs.append(output)
        for _ in range(future):
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs.append(output)
        return torch.cat(outputs, dim=1)


def make_data(n=8, length=40, period=20):
    # like generate_sine_wave.py: each sequence is a sine shifted by a random offset
    x = np.empty((n, length), "int64")
    x[:] = np.array(range(length)) + np.random.randint(-4 * period, 4 * period, n).reshape(n, 1)
    return np.sin(x / 1.0 / period).astype("float64")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="LBFGS steps to run")
    parser.add_argument("--max-iter", type=int, default=3, help="LBFGS max_iter per step")
    parser.add_argument("--future", type=int, default=10, help="steps to predict past the input")
    opt = parser.parse_args()
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.from_numpy(make_data())
    input = data[3:, :-1]
    target = data[3:, 1:]
    test_input = data[:3, :-1]
    test_target = data[:3, 1:]
    seq = Sequence().double()
    criterion = nn.MSELoss()
    optimizer = optim.LBFGS(seq.parameters(), lr=0.8, max_iter=opt.max_iter)
    for i in range(opt.steps):
        print("STEP: ", i)

        def closure():
            optimizer.zero_grad()
            out = seq(input)
            loss = criterion(out, target)
            print("loss:", loss.item())
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        with torch.no_grad():
            pred = seq(test_input, future=opt.future)
            test_loss = criterion(pred[:, : -opt.future], test_target)
            print("test loss:", test_loss.item())
            y = pred.numpy()
    print("prediction tail", y[:, -1].tolist())
    print(f"final loss {test_loss.item()!r}")
