"""The batched device digest: a step's tensors mixed by a bounded number of ops, each
tensor's digest the one :func:`fingerprint` gives it alone, however tensors are grouped.
Run on CPU through the torchmix path (the path CUDA tensors take)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reprocheck.config import PHASES
from reprocheck.fingerprint import StepHasher, fingerprint
from reprocheck.recorder import StepRecorder, parameter_names
from reprocheck.trace import Trace, TraceWriter

fp = importlib.import_module("reprocheck.fingerprint")


@pytest.fixture(autouse=True)
def torchmix(monkeypatch):
    monkeypatch.setattr(fp, "_FORCE_TORCHMIX", True)


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    nan_payload = torch.tensor([0x7FC00001, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    return [
        torch.randn(3, 4, generator=g),
        torch.tensor(True),
        torch.arange(10),
        torch.zeros(0),
        torch.randn(2, dtype=torch.complex64, generator=g),
        torch.randn(5, 7, generator=g).t(),  # strided
        torch.randn(3, generator=g).bfloat16(),  # 6 bytes: a padded word
        torch.randn(4, 4, dtype=torch.complex64, generator=g).conj(),
        torch.randn(6, generator=g).neg().resolve_neg()._neg_view(),
        torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        torch.randn(9, generator=g)[1:],  # storage offset of 4 bytes
        torch.nn.Parameter(torch.randn(6, 6, generator=g)),
        nan_payload,  # quiet and signalling NaNs with payloads: every bit kept
        torch.tensor(-0.0),
        torch.randn(200_000, generator=g),  # above the batch size: mixed alone
    ]


def test_batched_digests_equal_each_tensors_own_digest():
    tensors = _tensors()
    expected = [fingerprint(t).value for t in tensors]
    for order in (list(range(len(tensors))), list(reversed(range(len(tensors))))):
        hasher = StepHasher()
        for i in order:
            hasher.add(tensors[i])
        digests, _ = hasher.finish()
        assert digests == [expected[i] for i in order]
    assert len(set(expected)) == len(expected)


def test_no_grouping_changes_a_digest(monkeypatch):
    """Flushes after every tensor, bins of a few words (tensors spread over many bins),
    and the layout cache evicting at once all give the same digests."""
    tensors = [t for t in _tensors() if t.numel() < 1000]
    expected = [fingerprint(t).value for t in tensors]
    hasher = StepHasher()
    for t in tensors:
        hasher.add(t)
        hasher.flush()
    assert hasher.finish()[0] == expected
    monkeypatch.setattr(fp, "_BIN_WORDS", 8)
    monkeypatch.setattr(fp, "_LAYOUT_BYTES", 0)
    for _ in range(2):
        for t in tensors:
            hasher.add(t)
        assert hasher.finish()[0] == expected


def test_a_flush_takes_the_values_of_that_moment():
    weight = torch.randn(8, 8)
    hasher = StepHasher()
    hasher.add(weight)
    hasher.flush()
    before = fingerprint(weight).value
    weight.add_(1.0)  # the same buffer layout, new values
    hasher.add(weight)
    digests, _ = hasher.finish()
    assert digests == [before, fingerprint(weight).value] and before != digests[1]


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _recorded_step_ops(layers: int, tmp_path, batched: bool, monkeypatch) -> tuple[int, int]:
    """(dispatched ops, records) of the third recorded Adam step of an MLP, every phase."""
    if not batched:
        monkeypatch.setattr(fp, "_BATCH_WORDS", -1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters())
    names = parameter_names(model)
    writer = TraceWriter(tmp_path / f"t{layers}{batched}.sqlite", {})
    recorder = StepRecorder(writer, PHASES)
    x = torch.randn(4, 16)
    for step in range(3):
        recorder.begin(step)
        out = model(x)
        loss = out.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count = _OpCount()
        with count:
            recorder.add_all("data", [("x", x)])
            recorder.add_all("outputs", [("out", out)])
            recorder.add_all("loss", [("loss", loss)])
            recorder.grads(model)
            recorder.state(model, [optimizer], names)
            recorder.commit(step, loss)
    writer.finish("complete")
    with Trace(writer.path) as trace:
        records = len(list(trace.records(2)))
    return count.ops, records


def test_a_recorded_step_dispatches_a_bounded_number_of_ops_flat_in_tensors(tmp_path, monkeypatch):
    small, small_records = _recorded_step_ops(10, tmp_path, True, monkeypatch)
    large, large_records = _recorded_step_ops(200, tmp_path, True, monkeypatch)
    # weight and bias: the parameter, its grad, and Adam's step and two moments
    assert large_records - small_records == 190 * 2 * 5
    assert large == small <= 300
    alone, _ = _recorded_step_ops(10, tmp_path, False, monkeypatch)
    assert alone > 10 * small  # tensor by tensor: ~25 ops each
