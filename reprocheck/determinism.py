"""Seed everything, apply the determinism controls, and snapshot the environment.

Two halves, because some controls only work before the interpreter starts:

* :func:`child_environment` runs in the parent and fills the child's environment
  (``PYTHONHASHSEED``, ``CUBLAS_WORKSPACE_CONFIG``, thread variables).
* :func:`apply_controls` runs in the child, before any user code: seeds, deterministic
  algorithms, cuDNN flags, thread count.
"""

from __future__ import annotations

import os
import platform
import random
import sys
from typing import TYPE_CHECKING, Any

from .config import Config, DeterminismConfig

if TYPE_CHECKING:  # the run's half imports torch; the parent's half (the environment) not
    import torch

# Environment variables that change numerics or reproducibility; every trace records them.
RELEVANT_ENV_VARS = (
    "PYTHONHASHSEED",
    "CUBLAS_WORKSPACE_CONFIG",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING",
    "TORCH_DETERMINISTIC",
)

NCCL_PREFIXES = ("NCCL_", "TORCH_NCCL_")  # every one set goes into the snapshot


def torch_source(*parts: str) -> str | None:
    """The path of a file (or folder) of the installed torch package, found without
    importing torch (config validation and device planning read its source); None where
    torch is not installed as a package of files."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), *parts)


def child_environment(
    controls: DeterminismConfig, threads: int | None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment a run's process starts with: the parent's, plus the controls that
    must be in place before the interpreter (hash seed) or CUDA (cuBLAS) starts."""
    env = dict(os.environ if base is None else base)
    if controls.pythonhashseed is not None:
        env["PYTHONHASHSEED"] = str(controls.pythonhashseed)
    if controls.cublas_workspace is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = controls.cublas_workspace
    if threads is not None:
        # OpenMP reads these once at start-up; torch.set_num_threads alone leaves
        # inter-op pools and MKL at their own defaults.
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    # The child's reprocheck must be the parent's, wherever the user's cwd is.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def seed_everything(seed: int, controls: DeterminismConfig) -> list[str]:
    """Seed the generators the controls ask for; returns what was seeded."""
    import numpy as np
    import torch

    seeded = []
    if controls.seed_python:
        random.seed(seed)
        seeded.append("random")
    if controls.seed_numpy:
        np.random.seed(seed % 2**32)
        seeded.append("numpy")
    if controls.seed_torch:
        torch.manual_seed(seed)  # also seeds every CUDA device's generator
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        seeded.append("torch")
    return seeded


def apply_controls(config: Config, device: str, threads: int | None) -> dict[str, Any]:
    """Apply every control in the run's own process; returns what was actually applied."""
    return apply_controls_for(config.determinism, config.seed, threads)


def apply_controls_for(
    controls: DeterminismConfig, seed: int, threads: int | None
) -> dict[str, Any]:
    """Apply the controls, seeding every generator from ``seed``; returns what was applied."""
    import torch

    applied: dict[str, Any] = {"preset": controls.preset}
    if threads is not None:
        torch.set_num_threads(threads)
    applied["threads"] = torch.get_num_threads()

    det = controls.deterministic_algorithms
    if det:
        torch.use_deterministic_algorithms(True, warn_only=(det == "warn"))
    applied["deterministic_algorithms"] = det
    if controls.fill_uninitialized_memory is not None:
        fill = getattr(torch.utils, "deterministic", None)
        if fill is not None and hasattr(fill, "fill_uninitialized_memory"):
            fill.fill_uninitialized_memory = bool(controls.fill_uninitialized_memory)
            applied["fill_uninitialized_memory"] = bool(controls.fill_uninitialized_memory)
    if controls.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = controls.cudnn_benchmark
    if controls.cudnn_deterministic is not None:
        torch.backends.cudnn.deterministic = controls.cudnn_deterministic
    applied["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    applied["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    applied["pythonhashseed"] = os.environ.get("PYTHONHASHSEED")
    applied["cublas_workspace"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    applied["seeded"] = seed_everything(seed, controls)
    applied["dataloader_generator"] = controls.dataloader_generator
    if controls.preset == "strict":
        applied["inductor"] = _strict_inductor()
    return applied


# inductor's settings the strict preset fixes, where the installed torch has them: its
# deterministic mode, random ops through eager's generator, no autotuning (it picks
# kernels by timing), no CUDA graphs
_STRICT_INDUCTOR = (
    ("deterministic", True),
    ("fallback_random", True),
    ("max_autotune", False),
    ("max_autotune_gemm", False),
    ("coordinate_descent_tuning", False),
    ("triton.cudagraphs", False),
)


def _strict_inductor() -> dict[str, Any]:
    """Set what :data:`_STRICT_INDUCTOR` names (feature-detected); returns what was set."""
    try:
        import torch._inductor.config as inductor
    except Exception:  # a torch without inductor: nothing to set
        return {}
    applied = {}
    for name, value in _STRICT_INDUCTOR:
        owner, _, key = name.rpartition(".")
        target = getattr(inductor, owner) if owner else inductor
        if hasattr(target, key):
            setattr(target, key, value)
            applied[name] = value
    return applied


def compile_cache_warm() -> bool | None:
    """Whether inductor's on-disk cache already holds compiled graphs (None: unknown): a
    warm cache loads kernels a run would otherwise generate — the same code either way."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        folder = cache_dir()
    except Exception:  # an older layout: unknown
        return None
    graphs = os.path.join(folder, "fxgraph")
    return os.path.isdir(graphs) and any(os.scandir(graphs))


def compile_settings() -> dict[str, Any] | None:
    """The inductor settings that change a compiled model's numerics, as they are now, and
    its on-disk cache (shared by the runs of an audit: a kernel compiled once is reused,
    the same code either way); None where inductor was never imported (nothing compiled)."""
    import sys

    inductor = sys.modules.get("torch._inductor.config")
    if inductor is None:
        return None
    out: dict[str, Any] = {}
    for name, _ in _STRICT_INDUCTOR:
        owner, _, key = name.rpartition(".")
        target = getattr(inductor, owner, None) if owner else inductor
        if target is not None and hasattr(target, key):
            out[name] = getattr(target, key)
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        out["cache_dir"] = cache_dir()
    except Exception:  # an older layout: the cache is where that torch keeps it
        out["cache_dir"] = None
    return out


def dataloader_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader shuffles and seeds its workers with."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed the libraries torch does not seed in workers from its seed.

    torch already seeds ``random`` and its own generator per worker from the loader's
    base seed; NumPy's global generator is seeded only by recent releases, so do it here
    whatever the version (idempotent where torch already did it).
    """
    import numpy as np
    import torch

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where present."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """The SIMD level torch dispatches CPU kernels to (avx2, avx512, ...)."""
    import torch

    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get() if get is not None else None


def package_versions() -> dict[str, str]:
    """The version of every installed distribution a module imported in this process
    comes from (``torch``, ``numpy``, the script's own libraries), by name; reprocheck
    itself is left out (its digests carry their own version, the hasher's name)."""
    import importlib.metadata as metadata

    tops = {name.partition(".")[0] for name in list(sys.modules)}
    try:
        owners = metadata.packages_distributions()
    except Exception:  # a broken installation's metadata: no versions rather than no run
        return {}
    found: dict[str, str] = {}
    for top in tops:
        for dist in owners.get(top, ()):
            if dist not in found and dist != "reprocheck":
                try:
                    found[dist] = metadata.version(dist)
                except metadata.PackageNotFoundError:
                    continue
    return dict(sorted(found.items()))


def environment_snapshot(applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything about this process that can change numerics; goes into every trace."""
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    snapshot: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {
            **{name: os.environ.get(name) for name in RELEVANT_ENV_VARS},
            # NCCL's algorithm, protocol and channels change the order of a reduction's sums
            **{k: v for k, v in sorted(os.environ.items()) if k.startswith(NCCL_PREFIXES)},
        },
    }
    if applied is not None:
        snapshot["controls"] = applied
    return snapshot
