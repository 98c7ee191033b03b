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
* :class:`StepHasher` — one step's digests (and sketches), with a single device→host
  copy per step on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
_FORCE_TORCHMIX = xxhash is None or os.environ.get("REPROCHECK_HASHER") == "torch"


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


# dtypes NumPy can view directly; the others (bfloat16, float8 ...) are viewed as bytes.
_NUMPY_DTYPES = frozenset(
    (
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
    )
)
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
        t = _as_bytes(t)
    elif t.dtype not in _NUMPY_DTYPES:
        t = t.reshape(-1).view(torch.uint8)
    return xxhash.xxh3_128_digest(t.numpy(), seed)


# torchmix-128 ------------------------------------------------------------------------
# Each 64-bit word w_i is mixed with its index i (splitmix64's finalizer over
# w_i + (i+1)·K), and the mixed words are summed into two lanes with different keys.
# A swap of two different words changes their mixed values, so the sum changes.


def _as_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_K = [_as_signed(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)]
_M1, _M2 = _as_signed(0xBF58476D1CE4E5B9), _as_signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _torchmix_device(t: torch.Tensor) -> torch.Tensor:
    """Two int64 lanes (a 128-bit digest) of the data, computed on the tensor's device."""
    data = _as_bytes(t)
    pad = (-data.numel()) % 8
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    words = data.view(torch.int64)
    lanes = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        index = torch.arange(
            start + 1, start + 1 + chunk.numel(), dtype=torch.int64, device=t.device
        )
        lanes[0] += _mix(chunk + index * _K[0]).sum()
        lanes[1] += _mix((chunk ^ _K[2]) + index * _K[1]).sum()
    return lanes


def _torchmix_finish(lanes: tuple[int, int], t_header: bytes, nbytes: int) -> bytes:
    """Fold dtype, shape and byte length into the two lanes (on the host, 16 bytes)."""
    key = int.from_bytes(t_header.ljust((len(t_header) + 7) // 8 * 8, b"\0"), "little")
    a = (lanes[0] + nbytes * 0x9E3779B97F4A7C15) & _MASK64
    b = lanes[1] & _MASK64
    while key:
        word, key = key & _MASK64, key >> 64
        a = _host_mix(a ^ word)
        b = _host_mix(b + word)
    a, b = _host_mix(a ^ b), _host_mix(b + (a * 0xC2B2AE3D27D4EB4F))
    return a.to_bytes(8, "little") + b.to_bytes(8, "little")


def _host_mix(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# Tensor types whose ``.numpy()`` is the tensor's own memory (subclasses may differ).
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _fast_path(t: torch.Tensor) -> bool:
    """Worth hashing straight from ``t.numpy()``: a plain CPU tensor of a NumPy dtype."""
    return (
        type(t) in _PLAIN
        and not _FORCE_TORCHMIX
        and t.dtype in _NUMPY_DTYPES
        and t.is_cpu
        and not t.requires_grad
    )


def fingerprint(t: torch.Tensor) -> Digest:
    """The exact digest of a tensor (dtype, shape and every bit of its data)."""
    if _fast_path(t):
        # The common case in one call: `.numpy()` refuses — and xxh3 refuses a
        # non-contiguous view — exactly the tensors `_xxh3` would treat otherwise (other
        # devices, conjugate/negative bits, dtypes NumPy lacks, strided memory); the cases
        # known beforehand are not tried (a refusal from torch costs ~10 µs).
        try:
            return Digest(xxhash.xxh3_128_digest(t.numpy(), _seed(t)))
        except (TypeError, ValueError, RuntimeError):
            pass
    t = _check(t)
    if t.is_cpu and not _FORCE_TORCHMIX:
        return Digest(_xxh3(t))
    lanes = _torchmix_device(t).cpu().tolist()
    return Digest(_torchmix_finish((lanes[0], lanes[1]), _header(t), _nbytes(t)))


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
    transpose in place keeps address and shape of a square matrix). The view keeps the old
    storage alive, so no other tensor can take its address."""
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
    state): (tensor, data_ptr, shape, dtype, NumPy view of its bytes, seed); None for a
    tensor hashed through a copy. xxh3 over the view gives :func:`fingerprint`'s digest."""
    t = _check(original)
    if not t.is_cpu or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return None
    flat = t if t.dtype in _NUMPY_DTYPES else t.reshape(-1).view(torch.uint8)
    return (original, t.data_ptr(), t.shape, t.dtype, flat.numpy(), _seed(t))


class StepHasher:
    """Collects the digests (and optionally sketches) of one step's tensors; on CUDA computes them
    on the device and copies all results to the host in ONE transfer at :meth:`finish`."""

    def __init__(self, with_sketch: bool = False) -> None:
        self.with_sketch = with_sketch
        # The step's digests in record order (None: computed on the device, filled in at
        # :meth:`finish`). Without sketches, a caller that hashed a tensor itself exactly as
        # :func:`fingerprint` does may append its digest here (the recorder's fast path).
        self.host: list[bytes | None] = []
        self._pending: list[
            tuple[int, torch.Tensor, bytes, int]
        ] = []  # (slot, lanes, header, nbytes)
        self._sketches: list[Sketch | None] = []  # in step with `host` with sketches on
        self._pending_sketches: list[tuple[int, torch.Tensor, int]] = []

    def add(self, t: torch.Tensor) -> None:
        """Digest ``t`` now (later in-place updates of ``t`` do not change it)."""
        t = _check(t)
        slot = len(self.host)
        if t.is_cpu and not _FORCE_TORCHMIX:
            self.host.append(_xxh3(t))
        else:
            self.host.append(None)
            self._pending.append((slot, _torchmix_device(t), _header(t), _nbytes(t)))
        if self.with_sketch:
            self._sketches.append(None)
            self._pending_sketches.append((slot, _sketch_device(t), t.numel()))

    def add_digest(self, digest: bytes) -> None:
        """A record whose digest was computed elsewhere (op depth); it has no sketch."""
        self.host.append(digest)
        if self.with_sketch:
            self._sketches.append(None)

    def finish(self) -> tuple[list[bytes], list[Sketch | None]]:
        """The step's digests and sketches in :meth:`add` order; then reset."""
        if self._pending:
            lanes = _gather([p[1] for p in self._pending])
            for (slot, _, header, nbytes), pair in zip(self._pending, lanes):
                self.host[slot] = _torchmix_finish((pair[0], pair[1]), header, nbytes)
        if self._pending_sketches:
            stats = _gather([s[1] for s in self._pending_sketches])
            for (slot, _, numel), row in zip(self._pending_sketches, stats):
                self._sketches[slot] = _sketch_from(row, numel)
        digests: list[bytes] = self.host  # type: ignore[assignment] - every slot is filled now
        sketches = self._sketches if self.with_sketch else [None] * len(digests)
        self.host, self._pending, self._sketches, self._pending_sketches = [], [], [], []
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
