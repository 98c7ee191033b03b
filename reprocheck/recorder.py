"""What is recorded at each step, and in which order.

A step's records go phase by phase in :data:`~reprocheck.config.PHASES` order — data,
outputs, loss, grads, weights, optimizer, rng — each phase's tensors in a fixed order
(batch order, ``named_parameters`` order, ``state_dict`` order). Step 0 is the initial
state: weights, optimizer and rng before the first update.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import importlib
import os
import random
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import numpy as np
import torch

from .config import TRACE_PHASES
from .contract import PHASE_DIGEST, STATE_PHASES, Recording
from .fingerprint import StepHasher
from .trace import LATENT_PHASES, TraceWriter, pack_ids

# the module itself (the package binds the public function under its name)
_fp = importlib.import_module(".fingerprint", __package__)

_PHASE_INDEX = {phase: index for index, phase in enumerate(TRACE_PHASES)}
RSS_EVERY = 100  # steps between samples of the run's resident memory

# Hashing beside training. A tensor of at least BESIDE_BYTES is hashed on a thread of its
# own while training goes on: the recorder takes the address of its bytes, then a
# copy-on-write alias of its storage (``torch._lazy_clone``, no copy made), and hands both
# to the thread. Training that writes the tensor before the thread has read it — the next
# optimizer step, a ``.data`` write, a forward moving a buffer — writes into a fresh copy
# (torch materialises copy-on-write storage on any write) and the thread reads the bytes as
# they were when recorded; a thread that is done has dropped its alias, and the write finds
# the storage its own again (no copy). So the digests are those hashing in place gives,
# whatever training does meanwhile. The thread logs the step as soon as its digests are
# in; the training thread waits for it only before it looks at those tensors again or logs
# the next step.
BESIDE_BYTES = 1 << 18
_LAZY_CLONE = getattr(torch, "_lazy_clone", None)  # torch ≥ 2.3


def _hash_jobs(jobs: list[Any], digests: list[Any]) -> None:
    """The thread's work: each (slot, bytes, seed, alias) hashed into ``digests[slot]``,
    its alias dropped as soon as it is read (a later write then needs no copy)."""
    xxh3 = _fp.xxhash.xxh3_128_digest
    for index, (slot, view, seed, _) in enumerate(jobs):
        digests[slot] = xxh3(view, seed)
        jobs[index] = None


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


def _memory(address: int, size: int) -> memoryview:
    """A view of ``size`` bytes at ``address`` (a generator's state, kept alive by its
    owner): ``tobytes()`` on it costs ~0.3 µs where ``ctypes.string_at`` costs ~2 µs warm,
    ~18 µs right after a training step."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class _NumpyState:
    """NumPy's global RandomState, read cheaply: ``np.random.get_state()`` costs ~30 µs
    (it copies the 624-word key through Python objects), so the Mersenne Twister's raw
    2,500 bytes are read through a view of its ctypes interface (~0.4 µs) and the full state only
    when they changed, or when a cached Gaussian could have been used since (legacy
    ``normal`` draws come in pairs: the second uses the cache without touching the MT
    state). Both conditions together make the shortcut exact. Where the raw state cannot
    be read (another bit generator, an old NumPy) every call reads the full state."""

    _RAW_BYTES = 624 * 4 + 4  # mt19937_state: uint32 key[624]; int pos

    def __init__(self) -> None:
        self._raw_at: tuple[Any, memoryview] | None = None
        try:
            generator = np.random.mtrand._rand._bit_generator
            if type(generator).__name__ == "MT19937":
                self._raw_at = (generator, _memory(generator.ctypes.state_address, self._RAW_BYTES))
        except (AttributeError, TypeError, ValueError):
            pass
        self._raw: bytes | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._has_gauss = True

    def _raw_state(self) -> bytes | None:
        if self._raw_at is None or np.random.mtrand._rand._bit_generator is not self._raw_at[0]:
            return None
        return self._raw_at[1].tobytes()

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


class _RandomState:
    """Python's ``random`` module state, read cheaply: ``random.getstate()`` builds a tuple
    of 625 ints (~10 µs, ~20 µs right after a training step), so the Mersenne Twister's
    raw words are read from the generator object (CPython's ``RandomObject``: ``int
    index; uint32_t state[624]`` after the object header) and the recorded tensor is
    rebuilt only when they changed. The layout is checked against ``getstate()`` once; where
    it does not match (another Python), every call goes through ``getstate()``."""

    _RAW_BYTES = 4 + 624 * 4

    def __init__(self) -> None:
        self._memory: memoryview | None = None
        self._raw: bytes | None = None
        self._words: torch.Tensor | None = None
        generator = random._inst  # type: ignore[attr-defined]
        try:
            memory = _memory(id(generator) + object.__basicsize__, self._RAW_BYTES)
            index, *words = struct.unpack(f"={1 + 624}I", memory.tobytes())
            internal = generator.getstate()[1]
            if list(internal) == [*words, index]:
                self._generator, self._memory = generator, memory
        except (AttributeError, TypeError, ValueError, struct.error):
            pass

    def read(self) -> torch.Tensor:
        """The 624 state words and the index, as int64 (``getstate()``'s order)."""
        if self._memory is not None and random._inst is self._generator:  # type: ignore[attr-defined]
            raw = self._memory.tobytes()
            if raw == self._raw and self._words is not None:
                return self._words
            state = np.empty(625, dtype=np.int64)
            state[:624] = np.frombuffer(raw, dtype=np.uint32, offset=4)
            state[624] = int.from_bytes(raw[:4], sys.byteorder, signed=True)
            self._raw, self._words = raw, torch.from_numpy(state)
            return self._words
        _version, internal, _gauss = random.getstate()
        words = np.frombuffer(array.array("I", internal), dtype=np.uint32)  # 625 ints, ~5 µs
        return torch.from_numpy(words.astype(np.int64))


_NUMPY_STATE: _NumpyState | None = None
_RANDOM_STATE: _RandomState | None = None


def rng_states() -> Iterator[tuple[str, torch.Tensor]]:
    """The state of every generator a training step may draw from. An unchanged NumPy or
    ``random`` state comes back as the same tensor object as the last time."""
    global _NUMPY_STATE, _RANDOM_STATE
    yield "torch.cpu", torch.get_rng_state()
    if torch.cuda.is_initialized() and torch.cuda.is_available():  # the cheap test first
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            yield f"torch.cuda:{index}", state
    if _NUMPY_STATE is None:
        _NUMPY_STATE, _RANDOM_STATE = _NumpyState(), _RandomState()
    numpy_state, numpy_gauss = _NUMPY_STATE.read()
    yield "numpy", numpy_state
    yield "numpy.gauss", numpy_gauss[0]
    yield "random", _RANDOM_STATE.read()  # type: ignore[union-attr]
    gauss = random._inst.gauss_next  # type: ignore[attr-defined]
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


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) → its name in ``state_dict``, to name optimizer state."""
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str], tag: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """Optimizer state as ``fc1.weight.exp_avg``, in parameter-group order."""
    # by id: a lookup keyed by the tensor itself runs `Tensor.__hash__` in Python each time
    states = {id(param): state for param, state in optimizer.state.items()}
    position = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            base = names.get(id(param))
            if base is None:
                base = f"param{position}"
            position += 1
            state = states.get(id(param))
            if not state:
                continue
            for key in sorted(state):
                value = state[key]
                if isinstance(value, torch.Tensor):
                    yield f"{tag}{base}.{key}", value
                else:
                    yield from flatten(value, f"{tag}{base}.{key}")


class StepRecorder:
    """Fingerprints the selected phases of each step and commits them to the trace.

    The hot path. A recorded step runs right after the training step has evicted the
    recorder from the CPU's caches, where each Python operation costs several times what
    it costs warm; so a record is a dict lookup and one ``xxh3`` call wherever that is
    exact: a tensor of the persistent phases (weights, optimizer state, generator states)
    seen at the last step under the same name, with the same storage address, shape, dtype
    and contiguous layout, is hashed from the view of its bytes kept from then; any other
    plain, contiguous CPU tensor without conjugate or negative bits is hashed in place
    through its address; the rest (strided memory, conjugate or negative bits, subclasses,
    other devices) take the careful way of :class:`~reprocheck.fingerprint.StepHasher`.
    All give the digest :func:`~reprocheck.fingerprint.fingerprint` gives, and none calls
    ``.numpy()`` on a user's tensor (it would make its storage non-resizable); with
    sketches, or torchmix, every record takes the careful way. With ``hash_thread``, the
    in-place hashes of tensors of :data:`BESIDE_BYTES` and more run on a thread beside
    training, through copy-on-write aliases (the same digests; see above)."""

    def __init__(
        self,
        writer: TraceWriter,
        phases: Iterable[str],
        with_sketch: bool = False,
        capture: tuple[int, Iterable[tuple[str, str]]] | None = None,
        recording: Recording | None = None,
        last: int | None = None,
        hash_thread: bool = False,
    ) -> None:
        self.writer = writer
        self.step = 0
        # ``--record sparse``: one digest per phase; ``--every M``: every M-th step (and
        # ``last``, where known) hashed, the others logged with no records
        recording = recording or Recording()
        self.sparse = recording.mode == "sparse"
        self.every = recording.every
        self.last = last
        self.sampling = True  # this step is hashed
        self._pending: tuple[int, float | None, float] | None = None  # a step not hashed
        self._bounds: list[tuple[str, int]] = []  # (phase, its first record) this step
        self._phase_ids: dict[str, int] = {}
        self._fold_keys: dict[int, bytes] = {}  # tensor id → xxh3-64 of its name, shape, dtype
        # (step, {(phase, name)}): tensors whose values are kept, for the numeric diff.
        self.capture_step = capture[0] if capture else None
        self.capture_names = frozenset(tuple(c) for c in capture[1]) if capture else frozenset()
        self.captured: dict[tuple[str, str], torch.Tensor] = {}
        self.phases = self._all_phases = frozenset(phases)
        self.with_sketch = with_sketch
        self._hasher = StepHasher(with_sketch=with_sketch)
        self._fast = not with_sketch and _fp.hasher_name("cpu") == "xxh3-128"
        self._ids = array.array("I")
        self._phase_index = 0
        self._observed: int | None = None  # records before the first latent one
        self._started = time.perf_counter()
        self.records = 0
        # (phase, name, shape, dtype) → (tensor id, xxh3 seed)
        self._tensor_ids: dict[tuple, tuple[int, int]] = {}
        # persistent phases: phase → name → [tensor, data_ptr, shape, dtype, NumPy view,
        # seed, id] of the tensors recorded at the last step, and those of this step
        self._kept: dict[str, dict[str, list]] = {}
        self._kept_now: dict[str, dict[str, list]] = {}
        self.rss: dict[str, float] = {}
        self.compiled = False  # the model runs through torch.compile (set by the loop)
        self.last_committed: int | None = None
        self.devices = {"cpu"}  # the devices whose tensors were hashed (generators: cpu)
        # hashing beside training (see BESIDE_BYTES): the step's tensors for the thread,
        # and the step it is hashing and logging
        self.beside = hash_thread and self._fast and _LAZY_CLONE is not None
        self._jobs: list[Any] = []
        self._waiting: Any = None  # the future of the step on the thread
        self._thread: Any = None  # a one-worker ThreadPoolExecutor, made at first use

    def begin(self, step: int) -> None:
        if self._pending is not None:  # the step before was not hashed: logged bare
            self._log(*self._pending)
        self.step = step
        self._started = time.perf_counter()
        if self.every is not None:
            self.sampling = step % self.every == 0 or step == self.last
            self.phases = self._all_phases if self.sampling else frozenset()

    def end(self, state: Callable[[], None]) -> None:
        """The run ends: a last step that was not hashed gets its state now (``state``
        records it; nothing has changed it since its commit), so the runs' final states
        are always compared."""
        if self._pending is None:
            return
        step, loss, wall = self._pending
        self._pending = None
        self.phases = self._all_phases & frozenset(STATE_PHASES)
        state()
        self.phases = self._all_phases
        self._log(step, loss, wall)

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    def add(self, phase: str, name: str, tensor: torch.Tensor) -> None:
        """Fingerprint a tensor now (later in-place updates don't change its record)."""
        self._add(phase, ((name, tensor),))
        self._hasher.flush()

    def _enter(self, phase: str) -> None:
        index = _PHASE_INDEX[phase]
        if index < self._phase_index:
            raise RuntimeError(
                f"phase {phase!r} recorded after {TRACE_PHASES[self._phase_index]!r}"
            )
        if not self._bounds or self._bounds[-1][0] != phase:
            self._bounds.append((phase, len(self._ids)))
        self._phase_index = index
        if self._observed is None and phase in LATENT_PHASES:
            self._observed = len(self._ids)  # the step's latent records start here

    def _tensor_id(self, phase: str, name: str, tensor: torch.Tensor) -> tuple[int, int]:
        key = (phase, name, tensor.shape, tensor.dtype)
        found = self._tensor_ids.get(key)
        if found is None:
            tensor_id = self.writer.tensor_id(
                phase, name, tuple(tensor.shape), str(tensor.dtype)[6:]
            )
            seed = _fp._seed(tensor) if self._fast else 0
            found = self._tensor_ids[key] = (tensor_id, seed)
        return found

    def _add(self, phase: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._enter(phase)
        capturing = self.step == self.capture_step
        known, ids, hasher, fast = self._tensor_ids, self._ids, self._hasher, self._fast
        beside = self.beside
        digests, xxh3 = hasher.host, _fp.xxhash.xxh3_128_digest if fast else None
        fast_path, raw = (_fp._fast_path if fast else _never), _fp._raw
        for name, tensor in named:
            if capturing and (phase, name) in self.capture_names:
                self.captured[(phase, name)] = tensor.detach().to("cpu", copy=True)
            # The hot path: a dict hit on objects torch already has, no string building.
            found = known.get((phase, name, tensor.shape, tensor.dtype))
            if found is None:
                found = self._tensor_id(phase, name, tensor)
            ids.append(found[0])
            if fast_path(tensor):  # exactly the tensors `_xxh3` hashes in place
                if beside and tensor.nbytes >= BESIDE_BYTES:
                    self._later(tensor, raw(tensor), found[1], digests)
                else:
                    digests.append(xxh3(raw(tensor), found[1]))
                continue
            self.devices.add(tensor.device.type)
            hasher.add(tensor)

    def _add_kept(self, phase: str, named: Iterable[tuple[str, Any]]) -> None:
        """A persistent phase: (name, value) pairs, values tensors or the numbers and
        containers a ``state_dict`` may hold (recorded as the tensors in them)."""
        if not self._fast or self.step == self.capture_step:
            self._add(phase, _tensors(named))
            return
        self.drain()  # (the last step's aliases gone: reading an address copies nothing)
        self._enter(phase)
        kept, now, ids = self._kept.get(phase, {}), self._kept_now.setdefault(phase, {}), self._ids
        digests, xxh3, holds = self._hasher.host, _fp.xxhash.xxh3_128_digest, _fp._view_holds
        for name, tensor in named:
            entry = kept.get(name)
            if holds(entry, tensor):
                now[name] = entry
                ids.append(entry[6])
                if entry[7]:
                    self._later(tensor, entry[4], entry[5], digests)
                else:
                    digests.append(xxh3(entry[4], entry[5]))
            elif not isinstance(tensor, torch.Tensor):
                self._add(phase, flatten(tensor, name))
            else:
                tensor_id, seed = self._tensor_id(phase, name, tensor)
                view = _fp._view_entry(tensor)
                ids.append(tensor_id)
                if view is None:  # not a contiguous CPU tensor: the careful way, each step
                    self.devices.add(tensor.device.type)
                    self._hasher.add(tensor)
                else:
                    big = self.beside and tensor.nbytes >= BESIDE_BYTES
                    now[name] = [*view, tensor_id, big]
                    if big:
                        self._later(tensor, view[4], seed, digests)
                    else:
                        digests.append(xxh3(view[4], seed))

    def _later(self, tensor: torch.Tensor, view: Any, seed: int, digests: list) -> None:
        """Hash ``view`` (``tensor``'s bytes, its address taken before this) on the thread
        beside training, through a copy-on-write alias (see :data:`BESIDE_BYTES`).

        Only a storage torch can grow goes beside: one without an allocator — what
        ``torch.load`` and ``torch.frombuffer`` make — lazily cloned, then written while
        its alias lives, crashes torch 2.13 (the copy finds no allocator; measured: a
        resumed optimizer's state written by its next step). Those, and storage torch
        cannot share copy-on-write at all (NumPy's, shared memory), are hashed here."""
        alias = None
        if tensor.untyped_storage().resizable():
            with torch.no_grad(), contextlib.suppress(RuntimeError, NotImplementedError):
                alias = _LAZY_CLONE(tensor)  # type: ignore[misc] - beside: it exists
        if alias is None:
            digests.append(_fp.xxhash.xxh3_128_digest(view, seed))
            return
        self._jobs.append((len(digests), view, seed, alias))
        digests.append(None)

    def add_digests(
        self, phase: str, named: Iterable[tuple[str, tuple[int, ...], str, bytes]]
    ) -> None:
        """Records whose digests were taken earlier, when their values were there (a
        collective's input, before it was reduced in place): (name, shape, dtype, digest)."""
        if phase not in self.phases:
            return
        self._enter(phase)
        for name, shape, dtype, digest in named:
            self._ids.append(self.writer.tensor_id(phase, name, shape, dtype))
            self._hasher.add_digest(digest)

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
            self._hasher.flush()

    def add_state(self, phase: str, named: Iterable[tuple[str, Any]]) -> None:
        """Like :meth:`add_all` for the tensors a run keeps from step to step (weights,
        optimizer state, generator states): values may also be the numbers and containers
        a ``state_dict`` holds, recorded as the tensors in them."""
        if phase in self.phases:
            self._add_kept(phase, named)
            self._hasher.flush()

    def commit(self, step: int, loss: torch.Tensor | None) -> None:
        """One logged write per step; the hasher's single device→host copy happens here."""
        loss_value = None
        if loss is not None:
            loss_value = (
                loss.item()
                if loss.dtype in (torch.float32, torch.float64) and loss.numel() == 1
                else float(loss.detach().float().mean())
            )
        wall = time.perf_counter() - self._started
        self.last_committed = step
        if not self.sampling:  # logged bare at the next step, or with its state at the end
            self._pending = (step, loss_value, wall)
            return
        self._log(step, loss_value, wall)

    def _log(self, step: int, loss_value: float | None, wall: float) -> None:
        self.drain()
        digests, sketches = self._hasher.finish()
        stored = (
            [(step, seq, *s.to_tuple()[:4]) for seq, s in enumerate(sketches) if s is not None]
            if self.with_sketch
            else []
        )
        ids = self._ids
        observed = len(ids) if self._observed is None else self._observed
        logged = (step, ids, digests, stored, loss_value, wall, observed, self._bounds)
        self._pending = None
        self._ids = array.array("I")
        self._bounds = []
        self._observed = None
        self._kept, self._kept_now = self._kept_now, {}
        self._phase_index = 0
        if not self._jobs:
            self._write(*logged)
            return
        if self._thread is None:
            from concurrent.futures import ThreadPoolExecutor

            self._thread = ThreadPoolExecutor(1, thread_name_prefix="reprocheck-hash")
        jobs, self._jobs = self._jobs, []
        self._waiting = self._thread.submit(self._beside, jobs, logged)

    def _beside(self, jobs: list[Any], logged: tuple) -> None:
        """On the thread: hash the step's large tensors, then log the step — at once, so a
        run killed in its next step (a timeout, a hang) keeps it, as in-place hashing
        would (the writer locks what the training thread may touch meanwhile: tensor
        registrations; the next step is logged only after this one, see :meth:`drain`)."""
        _hash_jobs(jobs, logged[2])
        self._write(*logged)

    def drain(self) -> None:
        """Wait for the step the thread beside training is hashing and logging (before the
        recorder reads those tensors' addresses again, logs the next step, or the run ends)."""
        if self._waiting is not None:
            future, self._waiting = self._waiting, None
            future.result()  # (its error, a full disk say, raised here)

    def _write(
        self,
        step: int,
        ids: array.array,
        digests: list[bytes],
        stored: list,
        loss_value: float | None,
        wall: float,
        observed: int,
        bounds: list[tuple[str, int]],
    ) -> None:
        if self.sparse and ids:
            ids, digests, observed = self._fold(ids, bounds, digests)
        self.writer.log_step(
            step, pack_ids(ids), b"".join(digests), stored, loss_value, wall, observed
        )
        self.records += len(digests)
        if step % RSS_EVERY == 0:
            rss = rss_mib()
            if rss is not None:  # memory over the run: flat after warm-up, or a leak
                self.rss[str(step)] = rss
                self.writer.set_meta(rss_mib=self.rss)

    def _fold(
        self, step_ids: array.array, bounds: list[tuple[str, int]], digests: list[bytes]
    ) -> tuple[array.array, list[bytes], int]:
        """``--record sparse``: the step's records as one per phase — xxh3-128 over the
        keys of the phase's tensors (xxh3-64 of name, shape and dtype) in record order, then
        their digests, so any change in a value, a name, a shape, a dtype or the order
        changes it, and nothing else does (not the order the trace met its tensors in);
        (ids, digests, observable records)."""
        ids, folded, observed = array.array("I"), [], 0
        keys, xxh64 = self._fold_keys, _fp.xxhash.xxh3_64_digest
        for tensor_id in step_ids:
            if tensor_id not in keys:
                keys[tensor_id] = xxh64("\0".join(self.writer.tensor_key(tensor_id)).encode())
        ends = [start for _, start in bounds[1:]] + [len(step_ids)]
        for (phase, start), end in zip(bounds, ends):
            if start == end:
                continue
            found = self._phase_ids.get(phase)
            if found is None:
                found = self._phase_ids[phase] = self.writer.tensor_id(
                    phase, PHASE_DIGEST, (), "phase"
                )
            ids.append(found)
            folded.append(
                _fp.xxhash.xxh3_128_digest(
                    b"".join(keys[i] for i in step_ids[start:end]) + b"".join(digests[start:end])
                )
            )
            observed += phase not in LATENT_PHASES
        return ids, folded, observed

    # The phases, each from the objects a training loop has at hand.
    def state(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        names: Mapping[int, str],
    ) -> None:
        """weights, optimizer and rng: the state after an update (or before training)."""
        if "weights" in self.phases:
            # keep_vars: the tensors themselves, not detached copies; a module's extra state
            # (any picklable value) is recorded as the tensors inside it
            self._add_kept("weights", model.state_dict(keep_vars=True).items())
        if "optimizer" in self.phases:
            for index, optimizer in enumerate(optimizers):
                tag = f"opt{index}." if len(optimizers) > 1 else ""
                self._add_kept("optimizer", optimizer_tensors(optimizer, names, tag))
        self._hasher.flush()  # weights and optimizer state as they are now, in one batch
        self.add_state("rng", rng_states())

    def grads(self, model: torch.nn.Module) -> None:
        self.add_all(
            "grads", ((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
        )


def _never(tensor: torch.Tensor) -> bool:
    return False


def _tensors(named: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in named:
        yield from flatten(value, name)
