"""Exact digests and numeric sketches of tensors, on the tensor's own device.

* :func:`fingerprint` — a 128-bit digest that changes when any bit of the data changes,
  when elements are permuted, or when dtype or shape change; it depends on the tensor's
  logical content only (a view and its ``.contiguous()`` copy agree). On CPU: xxh3-128
  (``xxhash``) over the bytes, zero-copy for contiguous tensors. On CUDA, or where
  ``xxhash`` is missing, or with ``REPROCHECK_HASHER=torch``: *torchmix-128*, an
  order-aware integer mixing reduction in torch ops on the device. Integer arithmetic
  only (addition mod 2**64 is associative), so it is the same whatever the thread count.
* :func:`sketch` — float64 sum, sum of squares, absmax and non-finite count: for
  comparisons under a tolerance, taken only where used.
* :class:`StepHasher` — one step's digests (and sketches): on CUDA a phase's small tensors
  are mixed together by a bounded number of ops (the same digests), and one device→host
  copy per step brings every result back.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .contract import HASHER_ENV

try:
    import xxhash
except ImportError:  # the pure-torch fallback serves
    xxhash = None

DIGEST_SIZE = 16
_CHUNK_WORDS = 1 << 20  # torchmix processes this many int64 words at a time (bounded memory)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Digest:
    """A tensor's exact digest: equal iff dtype, shape and every bit of the data agree."""

    value: bytes

    def hex(self) -> str:
        return self.value.hex()

    def __str__(self) -> str:
        text = self.value.hex()
        return f"{text[:4]}…{text[-4:]}"

    def __repr__(self) -> str:
        return f"Digest({self.value.hex()})"


@dataclass(frozen=True)
class Sketch:
    """Float64 statistics of a tensor; NaN/Inf are left out of the sums and counted."""

    sum: float
    sum_sq: float
    absmax: float
    nonfinite: int
    numel: int

    def to_tuple(self) -> tuple[float, float, float, int, int]:
        return (self.sum, self.sum_sq, self.absmax, self.nonfinite, self.numel)


# REPROCHECK_HASHER=torch runs the device-side digest on CPU too (tests of the CUDA path).
_FORCE_TORCHMIX = xxhash is None or os.environ.get(HASHER_ENV) == "torch"


def _use_torchmix(device: torch.device) -> bool:
    return _FORCE_TORCHMIX or device.type != "cpu"


def hasher_name(device: torch.device | str = "cpu") -> str:
    """Which digest runs for tensors on ``device``: ``xxh3-128`` or ``torchmix-128``."""
    return "torchmix-128" if _use_torchmix(torch.device(device)) else "xxh3-128"


def _header(t: torch.Tensor) -> bytes:
    """dtype and shape: part of the key, so a reshape or a cast changes the digest."""
    return f"{t.dtype}|{','.join(map(str, t.shape))}|".encode()


def _check(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fingerprint takes a torch.Tensor, got {type(t).__name__}")
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor) and type(t).__name__ == "DTensor":
        t = local  # a DTensor (FSDP2, tensor parallel): this rank's shard, as it is stored
    if t.layout != torch.strided:
        raise TypeError(
            f"fingerprint: {t.layout} tensors are not supported; call .to_dense() first"
        )
    if t.is_meta:
        raise TypeError("fingerprint: a meta tensor has no data to fingerprint")
    return t.detach() if t.requires_grad else t


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's logical content as a flat uint8 tensor (one copy only if not contiguous)."""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


class FreedStorageError(ValueError):
    """A tensor whose storage no longer holds its elements (freed by ``resize_(0)``, as
    FSDP2 does to its unsharded parameters between uses): it has no values to digest."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(
            f"a {tuple(t.shape)} {str(t.dtype)[6:]} tensor whose storage was freed "
            f"({t.untyped_storage().nbytes()} bytes left): it has no values to fingerprint"
        )


_ARRAYS: dict[int, Any] = {}  # byte length → its ctypes array type


def _raw(t: torch.Tensor) -> Any:
    """The bytes of a contiguous CPU tensor, read in place through its address (a buffer
    xxh3 takes). Never ``t.numpy()``: that marks the tensor's storage non-resizable for
    good (measured), which breaks code that frees and regrows storage — FSDP2 resizes
    every unsharded parameter's storage to 0 after backward."""
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return b""
    if t.untyped_storage().nbytes() < t.storage_offset() * t.element_size() + nbytes:
        raise FreedStorageError(t)
    kind = _ARRAYS.get(nbytes)
    if kind is None:
        kind = ctypes.c_char * nbytes
        if len(_ARRAYS) < 100_000:
            _ARRAYS[nbytes] = kind
    return kind.from_address(t.data_ptr())


_SEEDS: dict[tuple[torch.dtype, torch.Size], int] = {}


def _seed(t: torch.Tensor) -> int:
    """dtype and shape folded into xxh3's 64-bit seed (cached: the hot path stays one call)."""
    key = (t.dtype, t.shape)
    seed = _SEEDS.get(key)
    if seed is None:
        seed = xxhash.xxh3_64_intdigest(_header(t))
        if len(_SEEDS) < 100_000:
            _SEEDS[key] = seed
    return seed


def _xxh3(t: torch.Tensor) -> bytes:
    seed = _seed(t)
    if not t.is_contiguous() or t.is_conj() or t.is_neg():
        t = _as_bytes(t)  # a contiguous copy, alive while it is hashed
    return xxhash.xxh3_128_digest(_raw(t), seed)


# torchmix-128 ------------------------------------------------------------------------
# Each 64-bit word w_i (i = 1, 2, ... within its tensor; the last word zero-padded) is
# mixed with its index (splitmix64's finalizer over w_i + i·K0, and over (w_i ^ K2) + i·K1
# for the second lane), and the mixed words are summed into two lanes. A swap of two
# different words changes their mixed values, so the sum changes; integer addition mod
# 2**64 is associative, so no grouping or thread count changes a lane.
#
# A tensor's lanes depend on its own words alone, so many tensors can be mixed by one
# chain of ops: :class:`StepHasher` copies a phase's small tensors into one buffer (one
# ``_foreach_copy_`` per dtype, into views of the buffer kept from step to step), mixes
# the whole buffer at once and sums each tensor's words into its own lanes with one
# ``index_add_`` — about 20 dispatched ops per phase, however many tensors it holds,
# where hashing tensor by tensor costs ~20 each (kernel launches on a GPU).


def _as_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_K = [_as_signed(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)]
_M1, _M2 = _as_signed(0xBF58476D1CE4E5B9), _as_signed(0x94D049BB133111EB)
_KEYS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _keys(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two lanes' index multipliers and word keys, as (2, 1) tensors on ``device``."""
    keys = _KEYS.get(device)
    if keys is None:
        multipliers = torch.tensor([[_K[0]], [_K[1]]], dtype=torch.int64, device=device)
        word_keys = torch.tensor([[0], [_K[2]]], dtype=torch.int64, device=device)
        keys = _KEYS[device] = (multipliers, word_keys)
    return keys


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _mixed(words: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(2, n) mixed values of n words at their (1-based) indices within their tensors."""
    multipliers, word_keys = _keys(words.device)
    return _mix((words ^ word_keys) + index * multipliers)


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's logical content as int64 words, the last one zero-padded (a view of a
    contiguous tensor whose size and offset are multiples of 8 bytes, else a copy)."""
    data = _as_bytes(t)
    pad = (-data.numel()) % 8
    if pad or data.storage_offset() % 8:
        data = torch.cat([data, data.new_zeros(pad)])
    return data.view(torch.int64)


def _torchmix_device(t: torch.Tensor) -> torch.Tensor:
    """Two int64 lanes (a 128-bit digest) of one tensor, computed on its device in chunks
    of ``_CHUNK_WORDS`` (bounded memory)."""
    words = _words(t)
    lanes = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        index = torch.arange(
            start + 1, start + 1 + chunk.numel(), dtype=torch.int64, device=t.device
        )
        lanes += _mixed(chunk, index).sum(dim=1)
    return lanes


_BATCH_WORDS = 1 << 17  # tensors up to 1 MiB are copied into a batch; larger ones mixed alone
_BIN_WORDS = 1 << 23  # one batch's buffer: up to 64 MiB
_LAYOUT_BYTES = 256 << 20  # the buffers kept between steps, per device
_foreach_copy = getattr(torch, "_foreach_copy_", None)


class _Layout:
    """One batch's buffer for a given sequence of (dtype, shape): each tensor's words at an
    offset, the views it is copied into, and each word's tensor (for the lane sums)."""

    def __init__(self, device: torch.device, specs: Sequence[tuple[torch.dtype, torch.Size]]):
        sizes = [
            (torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() + 7) // 8
            for dtype, shape in specs
        ]
        self.words = sum(sizes)
        self.buffer = torch.zeros(self.words, dtype=torch.int64, device=device)
        raw = self.buffer.view(torch.uint8)
        self.views: dict[torch.dtype, tuple[list[int], list[torch.Tensor]]] = {}
        starts, ends, offset = [], [], 0
        for slot, ((dtype, shape), size) in enumerate(zip(specs, sizes)):
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            view = raw[offset * 8 : offset * 8 + nbytes].view(dtype).view(shape)
            slots, views = self.views.setdefault(dtype, ([], []))
            slots.append(slot)
            views.append(view)
            starts.append(offset)
            offset += size
            ends.append(offset)
        self.starts = torch.tensor(starts, dtype=torch.int64, device=device)
        self.ends = torch.tensor(ends, dtype=torch.int64, device=device)
        self.nbytes = self.words * 8

    def lanes(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(2, len(tensors)) lanes: the tensors copied in (one op per dtype), mixed, summed."""
        for slots, views in self.views.values():
            sources = [tensors[s] for s in slots]
            if _foreach_copy is not None:
                _foreach_copy(views, sources)
            else:  # torch without _foreach_copy_
                for view, source in zip(views, sources):
                    view.copy_(source)
        position = torch.arange(self.words, dtype=torch.int64, device=self.buffer.device)
        owner = torch.bucketize(position, self.ends, right=True)
        index = position - self.starts.index_select(0, owner) + 1
        lanes = self.buffer.new_zeros((2, len(self.ends)))
        return lanes.index_add_(1, owner, _mixed(self.buffer, index))


class _Layouts:
    """The batch buffers kept per device, least recently used evicted past the budget."""

    def __init__(self) -> None:
        self._kept: dict[tuple, _Layout] = {}
        self._bytes: dict[torch.device, int] = {}

    def get(self, device: torch.device, specs: tuple) -> _Layout:
        key = (device, specs)
        layout = self._kept.pop(key, None)
        if layout is None:
            layout = _Layout(device, specs)
            self._bytes[device] = self._bytes.get(device, 0) + layout.nbytes
            while self._bytes[device] > _LAYOUT_BYTES and self._kept:
                evicted_key = next((k for k in self._kept if k[0] == device), None)
                if evicted_key is None:
                    break
                self._bytes[device] -= self._kept.pop(evicted_key).nbytes
        self._kept[key] = layout  # most recently used last
        return layout


_LAYOUTS = _Layouts()


_LIMBS: dict[bytes, tuple[int, ...]] = {}


def _limbs(header: bytes) -> tuple[int, ...]:
    """The header's bytes as 64-bit little-endian words (the last zero-padded)."""
    limbs = _LIMBS.get(header)
    if limbs is None:
        key = int.from_bytes(header.ljust((len(header) + 7) // 8 * 8, b"\0"), "little")
        found = []
        while key:
            found.append(key & _MASK64)
            key >>= 64
        limbs = tuple(found)
        if len(_LIMBS) < 100_000:
            _LIMBS[header] = limbs
    return limbs


def _np_mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _torchmix_finish(lanes: np.ndarray, keys: Sequence[tuple[bytes, int]]) -> list[bytes]:
    """The digests of tensors from their (2, n) int64 lanes and (header, byte length):
    dtype, shape and length folded into each tensor's two lanes, on the host, for all n at
    once (uint64 arithmetic wraps mod 2**64, as the device's int64 does)."""
    limbs = [_limbs(header) for header, _ in keys]
    width = max(map(len, limbs), default=0)
    table = np.array([row + (0,) * (width - len(row)) for row in limbs], dtype=np.uint64)
    counts = np.array([len(row) for row in limbs])
    nbytes = np.array([n for _, n in keys], dtype=np.uint64)
    lanes = np.ascontiguousarray(lanes, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        a = lanes[0] + nbytes * np.uint64(0x9E3779B97F4A7C15)
        b = lanes[1].copy()
        for i in range(width):
            live, word = i < counts, table[:, i]
            a = np.where(live, _np_mix(a ^ word), a)
            b = np.where(live, _np_mix(b + word), b)
        a, b = _np_mix(a ^ b), _np_mix(b + a * np.uint64(0xC2B2AE3D27D4EB4F))
    raw = np.stack([a, b], axis=1).astype("<u8").tobytes()
    return [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# Tensor types whose memory at ``data_ptr()`` is their content (subclasses may differ).
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _fast_path(t: torch.Tensor) -> bool:
    """Hashed in place, in one call (:func:`_raw`): a plain, contiguous CPU tensor without
    conjugate or negative bits — exactly the tensors :func:`_xxh3` hashes without a copy."""
    return (
        type(t) in _PLAIN
        and not _FORCE_TORCHMIX
        and t.is_cpu
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


def fingerprint(t: torch.Tensor) -> Digest:
    """The exact digest of a tensor (dtype, shape and every bit of its data)."""
    if _fast_path(t):
        return Digest(xxhash.xxh3_128_digest(_raw(t), _seed(t)))
    t = _check(t)
    if t.is_cpu and not _FORCE_TORCHMIX:
        return Digest(_xxh3(t))
    lanes = _torchmix_device(t).view(2, 1).cpu().numpy()
    return Digest(_torchmix_finish(lanes, [(_header(t), _nbytes(t))])[0])


def _sketch_device(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum_sq, absmax, nonfinite, numel] as float64, on the tensor's device."""
    if t.is_complex():
        t = torch.view_as_real(t)
    values = t.reshape(-1).to(torch.float64)
    finite = torch.isfinite(values)
    kept = torch.where(finite, values, torch.zeros((), dtype=torch.float64, device=t.device))
    absmax = kept.abs().max() if kept.numel() else kept.new_zeros(())
    return torch.stack(
        [
            kept.sum(),
            (kept * kept).sum(),
            absmax,
            (~finite).sum().to(torch.float64),
            kept.new_tensor(float(t.numel())),
        ]
    )


def _sketch_from(values: list[float], numel: int) -> Sketch:
    return Sketch(values[0], values[1], values[2], int(values[3]), numel)


def sketch(t: torch.Tensor) -> Sketch:
    """Float64 sum, sum of squares, absmax and non-finite count (complex: both parts)."""
    t = _check(t)
    return _sketch_from(_sketch_device(t).cpu().tolist(), t.numel())


def _view_holds(entry: Sequence[Any] | None, t: torch.Tensor) -> bool:
    """A kept view (see :func:`_view_entry`) still shows ``t``'s bytes: the same object at
    the same storage address, with the same shape and dtype, still contiguous (a
    transpose in place keeps address and shape of a square matrix). The view reads the
    memory at that address, which is then ``t``'s own (a ``.data`` swap whose new storage
    took the old address holds ``t``'s new values there)."""
    return (
        entry is not None
        and entry[0] is t
        and entry[1] == t.data_ptr()
        and entry[2] == t.shape
        and entry[3] == t.dtype
        and t.is_contiguous()
    )


def _view_entry(original: torch.Tensor) -> tuple | None:
    """What the recorder keeps of a tensor it hashes every step (a weight, an optimizer
    state): (tensor, data_ptr, shape, dtype, a view of its bytes, seed); None for a tensor
    hashed another way each step. xxh3 over the view gives :func:`fingerprint`'s digest."""
    if not _fast_path(original):
        return None
    t = original
    return (original, t.data_ptr(), t.shape, t.dtype, _raw(t), _seed(t))


class StepHasher:
    """Collects the digests (and optionally sketches) of one step's tensors. Device-side
    (torchmix) digests are computed on the tensors' devices: :meth:`flush` mixes the small
    tensors added since the last flush in batches (a bounded number of ops, see above),
    larger tensors are mixed one by one as they come, and :meth:`finish` copies every
    result to the host in ONE transfer per device."""

    def __init__(self, with_sketch: bool = False) -> None:
        self.with_sketch = with_sketch
        # The step's digests in record order (None: computed on the device, filled in at
        # :meth:`finish`). Without sketches, a caller that hashed a tensor itself exactly as
        # :func:`fingerprint` does may append its digest here (the recorder's fast path).
        self.host: list[bytes | None] = []
        self._batch: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        self._lanes: list[tuple[list[int], torch.Tensor]] = []  # (slots, (2, len) lanes)
        self._finish_keys: dict[int, tuple[bytes, int]] = {}  # slot → (header, nbytes)
        self._sketches: list[Sketch | None] = []  # in step with `host` with sketches on
        self._pending_sketches: list[tuple[int, torch.Tensor, int]] = []

    def add(self, t: torch.Tensor) -> None:
        """Digest ``t`` as it is now, or at the next :meth:`flush` for a small device-side
        tensor: the caller flushes before ``t`` can change (the recorder does, before it
        returns to the training code)."""
        if type(t) not in _PLAIN or t.layout != torch.strided or t.is_meta:
            t = _check(t)  # a clear error for what cannot be fingerprinted
        slot = len(self.host)
        if t.is_cpu and not _FORCE_TORCHMIX:
            self.host.append(_xxh3(_check(t)))
        else:
            self.host.append(None)
            nbytes = _nbytes(t)
            self._finish_keys[slot] = (_header(t), nbytes)
            if nbytes == 0:
                no_lanes = np.zeros((2, 1), dtype=np.int64)
                self.host[slot] = _torchmix_finish(no_lanes, [self._finish_keys.pop(slot)])[0]
            elif type(t) in _PLAIN and nbytes <= _BATCH_WORDS * 8:
                self._batch.setdefault(t.device, []).append((slot, t))
            else:
                self._lanes.append(([slot], _torchmix_device(_check(t)).view(2, 1)))
        if self.with_sketch:
            self._sketches.append(None)
            self._pending_sketches.append((slot, _sketch_device(_check(t)), t.numel()))

    def add_digest(self, digest: bytes) -> None:
        """A record whose digest was computed elsewhere (op depth); it has no sketch."""
        self.host.append(digest)
        if self.with_sketch:
            self._sketches.append(None)

    def flush(self) -> None:
        """Mix the small tensors added since the last flush, in batches of up to
        ``_BIN_WORDS`` words per device, each through a buffer kept for its layout."""
        if not self._batch:
            return
        with torch.no_grad():
            for device, entries in self._batch.items():
                start, words = 0, 0
                for end, (_, t) in enumerate(entries):
                    size = (_nbytes(t) + 7) // 8
                    if words + size > _BIN_WORDS and end > start:
                        self._mix_bin(device, entries[start:end])
                        start, words = end, 0
                    words += size
                self._mix_bin(device, entries[start:])
        self._batch = {}

    def _mix_bin(self, device: torch.device, entries: list[tuple[int, torch.Tensor]]) -> None:
        tensors = [t for _, t in entries]
        layout = _LAYOUTS.get(device, tuple((t.dtype, t.shape) for t in tensors))
        self._lanes.append(([slot for slot, _ in entries], layout.lanes(tensors)))

    def finish(self) -> tuple[list[bytes], list[Sketch | None]]:
        """The step's digests and sketches in :meth:`add` order; then reset."""
        self.flush()
        by_device: dict[torch.device, list[tuple[list[int], torch.Tensor]]] = {}
        for slots, lanes in self._lanes:
            by_device.setdefault(lanes.device, []).append((slots, lanes))
        for pieces in by_device.values():
            lanes = torch.cat([lanes for _, lanes in pieces], dim=1).cpu().numpy()
            slots = [slot for slot_list, _ in pieces for slot in slot_list]
            digests = _torchmix_finish(lanes, [self._finish_keys[slot] for slot in slots])
            for slot, digest in zip(slots, digests):
                self.host[slot] = digest
        if self._pending_sketches:
            stats = _gather([s[1] for s in self._pending_sketches])
            for (slot, _, numel), row in zip(self._pending_sketches, stats):
                self._sketches[slot] = _sketch_from(row, numel)
        digests: list[bytes] = self.host  # type: ignore[assignment] - every slot is filled now
        sketches = self._sketches if self.with_sketch else [None] * len(digests)
        self.host, self._lanes, self._finish_keys = [], [], {}
        self._sketches, self._pending_sketches = [], []
        return digests, sketches


def _gather(tensors: list[torch.Tensor]) -> list[list]:
    """Stack per device and copy each device's results to the host once."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    rows: list[list] = [[] for _ in tensors]
    for indices in by_device.values():
        values = torch.stack([tensors[i] for i in indices]).cpu().tolist()
        for i, value in zip(indices, values):
            rows[i] = value
    return rows
