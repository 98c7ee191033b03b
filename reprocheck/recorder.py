"""What is recorded at each step, and in which order.

A step's records go phase by phase in :data:`~reprocheck.config.PHASES` order — data,
outputs, loss, grads, weights, optimizer, rng — each phase's tensors in a fixed order
(batch order, ``named_parameters`` order, ``state_dict`` order). Step 0 is the initial
state: weights, optimizer and rng before the first update.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .config import TRACE_PHASES
from .fingerprint import StepHasher
from .trace import TraceWriter

_PHASE_INDEX = {phase: index for index, phase in enumerate(TRACE_PHASES)}
_PERSISTENT = frozenset(("weights", "optimizer"))  # the same tensors every step
RSS_EVERY = 100  # steps between samples of the run's resident memory


def rss_mib() -> float | None:
    """This process's resident memory in MiB (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def flatten(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Name every tensor inside a (nested) batch or output: ``output``, ``output.logits``,
    ``output.0``; plain numbers become 0-d tensors; anything else is passed over."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        fields = getattr(obj, "_fields", None)  # namedtuple: its own field names
        for index, value in enumerate(obj):
            key = fields[index] if fields else str(index)
            yield from flatten(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(obj, bool):
        yield prefix, torch.tensor(obj)
    elif isinstance(obj, (int, float)):
        yield (
            prefix,
            torch.tensor(obj, dtype=torch.float64 if isinstance(obj, float) else torch.int64),
        )


def batch_tensors(batch: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A batch's tensors by name: ``(input, target)`` pairs, a dict's own keys, else ``batch.i``."""
    if isinstance(batch, torch.Tensor):
        yield "input", batch
    elif isinstance(batch, (list, tuple)) and len(batch) == 2 and not hasattr(batch, "_fields"):
        yield from flatten(batch[0], "input")
        yield from flatten(batch[1], "target")
    elif isinstance(batch, Mapping) or hasattr(batch, "_fields"):
        yield from flatten(batch, "")
    else:
        yield from flatten(batch, "batch")


class _NumpyState:
    """NumPy's global RandomState, read cheaply: ``np.random.get_state()`` costs ~30 µs
    (it copies the 624-word key through Python objects), so the Mersenne Twister's raw
    2,500 bytes are read through its ctypes interface (~0.4 µs) and the full state only
    when they changed, or when a cached Gaussian could have been used since (legacy
    ``normal`` draws come in pairs: the second uses the cache without touching the MT
    state). Both conditions together make the shortcut exact. Where the raw state cannot
    be read (another bit generator, an old NumPy) every call reads the full state."""

    _RAW_BYTES = 624 * 4 + 4  # mt19937_state: uint32 key[624]; int pos

    def __init__(self) -> None:
        self._raw_at: tuple[Any, int] | None = None
        try:
            generator = np.random.mtrand._rand._bit_generator
            if type(generator).__name__ == "MT19937":
                self._raw_at = (generator, int(generator.ctypes.state_address))
        except (AttributeError, TypeError, ValueError):
            pass
        self._raw: bytes | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._has_gauss = True

    def _raw_state(self) -> bytes | None:
        if self._raw_at is None or np.random.mtrand._rand._bit_generator is not self._raw_at[0]:
            return None
        return ctypes.string_at(self._raw_at[1], self._RAW_BYTES)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(key words + pos + has_gauss as int64, the cached Gaussian as float64)."""
        raw = self._raw_state()
        if raw is not None and raw == self._raw and not self._has_gauss and self._last:
            return self._last
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state = np.empty(keys.shape[0] + 2, dtype=np.int64)
        state[:-2] = keys
        state[-2:] = (pos, has_gauss)
        self._last = (torch.from_numpy(state), torch.tensor([float(cached)], dtype=torch.float64))
        self._raw, self._has_gauss = raw, bool(has_gauss)
        return self._last


_NUMPY_STATE: _NumpyState | None = None


def rng_states() -> Iterator[tuple[str, torch.Tensor]]:
    """The state of every generator a training step may draw from."""
    global _NUMPY_STATE
    yield "torch.cpu", torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            yield f"torch.cuda:{index}", state
    if _NUMPY_STATE is None:
        _NUMPY_STATE = _NumpyState()
    numpy_state, numpy_gauss = _NUMPY_STATE.read()
    yield "numpy", numpy_state
    yield "numpy.gauss", numpy_gauss[0]
    _version, internal, gauss = random.getstate()
    words = np.frombuffer(array.array("I", internal), dtype=np.uint32)  # 625 ints, ~5 µs
    yield "random", torch.from_numpy(words.astype(np.int64))
    yield "random.gauss", _float64(float("nan") if gauss is None else gauss)


_FLOATS: dict[str, torch.Tensor] = {}


def _float64(value: float) -> torch.Tensor:
    """A 0-d float64 tensor, shared for repeated values (NaN: Python's gauss cache empty)."""
    key = value.hex()  # tells -0.0 from 0.0, and a NaN from itself
    tensor = _FLOATS.get(key)
    if tensor is None:
        tensor = torch.tensor(value, dtype=torch.float64)
        if len(_FLOATS) > 64:
            _FLOATS.clear()
        _FLOATS[key] = tensor
    return tensor


def state_tensors(state: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """A ``state_dict``'s tensors by name; a non-tensor entry (a module's extra state) as
    the tensors and numbers inside it."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            yield name, value
        else:
            yield from flatten(value, name)


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) → its name in ``state_dict``, to name optimizer state."""
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str], tag: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """Optimizer state as ``fc1.weight.exp_avg``, in parameter-group order."""
    position = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            base = names.get(id(param), f"param{position}")
            position += 1
            state = optimizer.state.get(param)
            if not state:
                continue
            for key in sorted(state):
                yield from flatten(state[key], f"{tag}{base}.{key}")


class StepRecorder:
    """Fingerprints the selected phases of each step and commits them to the trace."""

    def __init__(
        self,
        writer: TraceWriter,
        phases: Iterable[str],
        with_sketch: bool = False,
        capture: tuple[int, Iterable[tuple[str, str]]] | None = None,
    ) -> None:
        self.writer = writer
        self.step = 0
        # (step, {(phase, name)}): tensors whose values are kept, for the numeric diff.
        self.capture_step = capture[0] if capture else None
        self.capture_names = frozenset(tuple(c) for c in capture[1]) if capture else frozenset()
        self.captured: dict[tuple[str, str], torch.Tensor] = {}
        self.phases = frozenset(phases)
        self.with_sketch = with_sketch
        self._hasher = StepHasher(with_sketch=with_sketch)
        self._ids: list[int] = []
        self._phase_index = 0
        self._started = time.perf_counter()
        self.records = 0
        self._tensor_ids: dict[tuple, int] = {}
        self.rss: dict[str, float] = {}
        self.compiled = False  # the model runs through torch.compile (set by the loop)

    def begin(self, step: int) -> None:
        self.step = step
        self._started = time.perf_counter()

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    def add(self, phase: str, name: str, tensor: torch.Tensor) -> None:
        """Fingerprint a tensor now (later in-place updates don't change its record)."""
        self._add(phase, ((name, tensor),))

    def _add(self, phase: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        index = _PHASE_INDEX[phase]
        if index < self._phase_index:
            raise RuntimeError(
                f"phase {phase!r} recorded after {TRACE_PHASES[self._phase_index]!r}"
            )
        self._phase_index = index
        capturing = self.step == self.capture_step
        persistent = phase in _PERSISTENT
        known, ids, hasher = self._tensor_ids, self._ids, self._hasher
        for name, tensor in named:
            if capturing and (phase, name) in self.capture_names:
                self.captured[(phase, name)] = tensor.detach().to("cpu", copy=True)
            # The hot path: a dict hit on objects torch already has, no string building.
            key = (phase, name, tensor.shape, tensor.dtype)
            tensor_id = known.get(key)
            if tensor_id is None:
                tensor_id = self.writer.tensor_id(
                    phase, name, tuple(tensor.shape), str(tensor.dtype)[6:]
                )
                known[key] = tensor_id
            ids.append(tensor_id)
            hasher.add(tensor, persistent)

    def add_ops(self, phase: str, ops: Iterable[Any]) -> None:
        """``--depth op``: one record per aten op, ``op:<index>:<name>``, from the digests of
        its outputs that :class:`~reprocheck.localize.OpCapture` took."""
        if phase not in self.phases:
            return
        for op in ops:
            digest = hashlib.blake2b(bytes.fromhex("".join(op.outputs)), digest_size=16).digest()
            self._ids.append(self.writer.tensor_id(phase, f"op:{op.index}:{op.op}", (), "op"))
            self._hasher.add_digest(digest)

    def add_all(self, phase: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fingerprint each (name, tensor) now, if ``phase`` is recorded."""
        if phase in self.phases:
            self._add(phase, named)

    def commit(self, step: int, loss: torch.Tensor | None) -> None:
        """One transaction per step; the hasher's single device→host copy happens here."""
        digests, sketches = self._hasher.finish()
        loss_value = float(loss.detach().float().mean()) if loss is not None else None
        rows = list(zip(self._ids, digests))
        stored = (
            [None if s is None else s.to_tuple()[:4] for s in sketches]
            if self.with_sketch
            else None
        )
        self.writer.write_step(step, rows, stored, loss_value, time.perf_counter() - self._started)
        self.records += len(rows)
        self._ids = []
        self._phase_index = 0
        if step % RSS_EVERY == 0:
            rss = rss_mib()
            if rss is not None:  # memory over the run: flat after warm-up, or a leak
                self.rss[str(step)] = rss
                self.writer.set_meta(rss_mib=self.rss)

    # The phases, each from the objects a training loop has at hand.
    def state(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        names: Mapping[int, str],
    ) -> None:
        """weights, optimizer and rng: the state after an update (or before training)."""
        # keep_vars: the tensors themselves, not detached copies; a module's extra state
        # (any picklable value) is recorded as the tensors inside it
        self.add_all("weights", state_tensors(model.state_dict(keep_vars=True)))
        if "optimizer" in self.phases:
            for index, optimizer in enumerate(optimizers):
                tag = f"opt{index}." if len(optimizers) > 1 else ""
                self.add_all("optimizer", optimizer_tensors(optimizer, names, tag))
        self.add_all("rng", rng_states())

    def grads(self, model: torch.nn.Module) -> None:
        self.add_all(
            "grads", ((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
        )
