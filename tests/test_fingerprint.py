"""The exact digest: every bit, order, dtype and shape count; layout and threads do not.
Both implementations: xxh3-128 (CPU) and torchmix-128 (the device-side CUDA path, run
here on CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reprocheck import fingerprint as public_fingerprint
from reprocheck.fingerprint import Digest, StepHasher, fingerprint, hasher_name, sketch

# `reprocheck.fingerprint` is the public function; the module is reached by its full name.
fp = importlib.import_module("reprocheck.fingerprint")


@pytest.fixture(params=["xxh3-128", "torchmix-128"])
def hasher(request, monkeypatch):
    monkeypatch.setattr(fp, "_FORCE_TORCHMIX", request.param == "torchmix-128")
    assert hasher_name("cpu") == request.param
    return request.param


DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _sample(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def test_public_api_is_the_digest_alone():
    digest = public_fingerprint(torch.arange(4.0))
    assert isinstance(digest, Digest) and len(digest.value) == fp.DIGEST_SIZE
    assert digest == fingerprint(torch.arange(4.0))
    assert str(digest) == f"{digest.hex()[:4]}…{digest.hex()[-4:]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_every_bit(hasher, dtype):
    t = _sample(dtype)
    base = fingerprint(t)
    assert fingerprint(t.clone()) == base
    if dtype == torch.bool:
        changed = t.clone()
        changed.view(-1)[3] = ~changed.view(-1)[3]
    else:
        raw = t.clone().reshape(-1).view(torch.uint8)
        raw[3] ^= 1
        changed = raw.view(dtype).reshape(t.shape)
    assert fingerprint(changed) != base


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_views_equal_their_contiguous_copy(hasher, dtype):
    t = _sample(dtype, (6, 8))
    for view in (t.t(), t[::2, 1::3], t[:, 2], t.unsqueeze(0).expand(3, 6, 8), t[1:4]):
        assert fingerprint(view) == fingerprint(view.contiguous())
    if dtype.is_complex:
        assert fingerprint(t.conj()) == fingerprint(t.conj().resolve_conj())
        assert fingerprint(t.conj()) != fingerprint(t)


def test_order_dtype_and_shape_are_in_the_key(hasher):
    a = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0])
    # a swap of two equal pairs for another equal pair (XOR- or sum-reductions miss it)
    b = torch.tensor([2.0, 1.0, 2.0, 1.0, 3.0])
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(a.flip(0))
    assert fingerprint(torch.zeros(4, dtype=torch.int32)) != fingerprint(
        torch.zeros(4, dtype=torch.float32)
    )
    assert fingerprint(torch.zeros(2, 3)) != fingerprint(torch.zeros(3, 2))
    assert fingerprint(torch.tensor(1.0)) != fingerprint(torch.tensor([1.0]))
    assert fingerprint(torch.zeros(0, 3)) != fingerprint(torch.zeros(3, 0))
    assert fingerprint(torch.zeros(0)) == fingerprint(torch.zeros(0))
    assert fingerprint(torch.tensor(-0.0)) != fingerprint(torch.tensor(0.0))


def test_requires_grad_and_tensors_it_refuses(hasher):
    w = torch.randn(3, requires_grad=True)
    assert fingerprint(w) == fingerprint(w.detach())
    with pytest.raises(TypeError, match=r"sparse|to_dense"):
        fingerprint(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="meta tensor"):
        fingerprint(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match=r"takes a torch\.Tensor"):
        fingerprint([1, 2, 3])


def test_thread_count_does_not_change_the_digest(hasher):
    t = torch.randn(4 * 2**20)  # 16 MiB
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(t)
        torch.set_num_threads(2)
        two = fingerprint(t)
    finally:
        torch.set_num_threads(previous)
    assert one == two


def test_the_two_hashers_differ_and_say_so(monkeypatch):
    t = torch.randn(10)
    monkeypatch.setattr(fp, "_FORCE_TORCHMIX", False)
    ours = fingerprint(t)
    monkeypatch.setattr(fp, "_FORCE_TORCHMIX", True)
    assert fingerprint(t) != ours  # never compared: the trace records which one ran


def test_step_hasher_matches_fingerprint_and_sketch(hasher):
    tensors = [
        torch.randn(3, 4),
        torch.tensor(True),
        torch.arange(10),
        torch.zeros(0),
        torch.randn(2, dtype=torch.complex64),
    ]
    hasher_ = StepHasher(with_sketch=True)
    for t in tensors:
        hasher_.add(t)
    hasher_.flush()  # what the recorder does before the training code runs again
    t0 = tensors[0]
    t0 += 1  # in place after the flush: the digest was taken already
    digests, sketches = hasher_.finish()
    assert digests[1:] == [fingerprint(t).value for t in tensors[1:]]
    assert digests[0] != fingerprint(t0).value
    assert sketches[2].sum == 45.0 and sketches[2].numel == 10
    assert hasher_.finish() == ([], [])


def test_sketch_values():
    s = sketch(torch.tensor([1.0, -3.0, float("nan"), float("inf"), 2.0]))
    assert (s.sum, s.sum_sq, s.absmax, s.nonfinite, s.numel) == (0.0, 14.0, 3.0, 2, 5)
    c = sketch(torch.tensor([3 + 4j], dtype=torch.complex64))
    assert (c.sum, c.sum_sq, c.absmax) == (7.0, 25.0, 4.0)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_single_bit_flip_changes_the_digest(data):
    numel = data.draw(st.integers(1, 64))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8]))
    t = _sample(dtype, (numel,))
    raw = t.clone().view(torch.uint8)
    byte = data.draw(st.integers(0, raw.numel() - 1))
    bit = data.draw(st.integers(0, 7))
    raw[byte] ^= 1 << bit
    flipped = raw.view(dtype)
    for force in (False, True):
        fp._FORCE_TORCHMIX = force
        try:
            assert fingerprint(flipped) != fingerprint(t)
        finally:
            fp._FORCE_TORCHMIX = fp.xxhash is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_digests_on_the_device_in_one_transfer():
    tensors = [torch.randn(1000, device="cuda") for _ in range(8)] + [
        torch.randn(300_000, device="cuda"),  # mixed alone
        torch.randn(40, 30, device="cuda").t(),
    ]
    hasher_ = StepHasher(with_sketch=True)
    for t in tensors:
        hasher_.add(t)
    hasher_.flush()
    assert all(lanes.device.type == "cuda" for _, lanes in hasher_._lanes)
    digests, _ = hasher_.finish()
    assert digests == [fingerprint(t).value for t in tensors]
    if hasher_name("cuda") == hasher_name("cpu"):
        assert digests == [fingerprint(t.cpu()).value for t in tensors]
    else:  # the device digest is torchmix-128 on either device
        fp._FORCE_TORCHMIX = True
        try:
            assert digests == [fingerprint(t.cpu()).value for t in tensors]
        finally:
            fp._FORCE_TORCHMIX = fp.xxhash is None


def test_persistent_views_follow_every_change_of_the_tensor(hasher, tmp_path):
    """Weights and optimizer state keep their NumPy view between steps (in the recorder):
    the digest must still follow in-place updates, `.data` swaps, dtype reinterpretation
    and transposes."""
    from reprocheck.recorder import StepRecorder
    from reprocheck.trace import Trace, TraceWriter

    param = torch.nn.Parameter(torch.randn(4, 4))
    state = torch.zeros(4, 4)
    writer = TraceWriter(tmp_path / "t.sqlite", {})
    recorder = StepRecorder(writer, ["weights"])
    step = 0

    def digests() -> list[bytes]:
        nonlocal step
        step += 1
        recorder.begin(step)
        recorder.add_state("weights", [("param", param), ("state", state)])
        recorder.commit(step, None)
        writer.fold()
        with Trace(writer.path, own=True) as trace:  # still being written: our own
            return [r.digest for r in trace.records(step)]

    changes = [
        lambda: None,
        lambda: param.data.add_(1.0),  # in place: same storage
        lambda: state.add_(2.0),
        lambda: setattr(param, "data", torch.randn(4, 4)),  # new storage, same object
        lambda: setattr(state, "data", state.data.view(torch.int32)),  # same bytes, new dtype
        lambda: state.t_(),  # same storage and shape, transposed: no longer contiguous
        lambda: state.copy_(torch.arange(16.0).reshape(4, 4)),
        lambda: setattr(param, "data", param.data.view(torch.float32)[:2]),  # smaller view
    ]
    for change in changes:
        change()
        assert digests() == [fingerprint(param).value, fingerprint(state).value]
    # nothing kept beyond the tensors of the last step
    assert sum(len(kept) for kept in recorder._kept.values()) <= 2
    writer.finish("complete")


def test_numpy_rng_shortcut_is_exact():
    """NumPy's state is read through the raw Mersenne Twister bytes and fully only when
    they changed or a cached Gaussian may have been used: the recorded state must equal
    `np.random.get_state()` after any sequence of draws, including the second of a pair
    of normals (which changes only the Gaussian cache)."""
    import random

    import numpy as np

    from reprocheck.recorder import rng_states

    def full() -> tuple[torch.Tensor, float]:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        return torch.from_numpy(np.append(keys.astype(np.int64), [pos, has_gauss])), cached

    draws = [
        lambda: None,
        lambda: np.random.normal(),  # fills the cache: MT state changes
        lambda: np.random.normal(),  # uses the cache: MT state unchanged
        lambda: None,
        lambda: np.random.rand(3),
        lambda: np.random.normal(),
        lambda: np.random.seed(7),  # clears the cache
        lambda: np.random.set_state(np.random.get_state()),
        lambda: random.random(),
    ]
    np.random.seed(0)
    for draw in draws:
        draw()
        recorded = dict(rng_states())
        state, cached = full()
        assert torch.equal(recorded["numpy"], state)
        assert recorded["numpy.gauss"].item() == cached
        internal = torch.tensor(random.getstate()[1], dtype=torch.int64)
        assert torch.equal(recorded["random"], internal)
