"""The audit config's schema: frozen dataclasses, the single source of truth for keys,
types, defaults, ranges and their documentation; the presets derived from them.

``config_reference_markdown`` renders the README's reference from the fields. Reading a
config file and validating it is :mod:`reprocheck.configfile`; importing user code named
in a config is :mod:`reprocheck.usercode`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

PHASES: tuple[str, ...] = ("data", "outputs", "loss", "grads", "weights", "optimizer", "rng")
# Every phase a trace can hold, in record order: `forward` and `backward` hold what
# `--depth module|op` records inside the step (module outputs, op outputs, grad_outputs);
# `comm` the inputs and outputs of the step's torch.distributed collectives (exec).
TRACE_PHASES: tuple[str, ...] = (
    "data",
    "forward",
    "outputs",
    "loss",
    "backward",
    "comm",
    "grads",
    "weights",
    "optimizer",
    "rng",
)

LOSSES = (
    "cross_entropy",
    "nll_loss",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
    "poisson_nll_loss",
    "gaussian_nll_loss",
    "hinge_embedding_loss",
    "margin_ranking_loss",
    "soft_margin_loss",
    "multilabel_soft_margin_loss",
    "multi_margin_loss",
    "cosine_embedding_loss",
    "ctc_loss",
    "triplet_margin_loss",
)

MAX_YAML_NODES = 100_000  # past this an alias bomb is refused, not expanded


class ConfigError(Exception):
    """A config mistake: one line, ``file:line: key: what is wrong — what to do``."""


def _doc(
    text: str,
    *,
    range: tuple[float, float] | None = None,
    presets: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A config field with its doc (the README's table, ``--help``), the range a number
    must lie in, and — for a control — its value under the presets other than
    ``seeded`` (whose values are the defaults)."""
    metadata: dict[str, Any] = {"doc": text}
    if range is not None:
        metadata["range"] = range
    if presets is not None:
        metadata["presets"] = dict(presets)
    return field(metadata=metadata, **kwargs)


@dataclass(frozen=True)
class DeterminismConfig:
    """Controls applied in each run; a preset sets all of them, each key overrides one."""

    preset: str = _doc(
        "`seeded` (default): seed everything · `strict`: also deterministic "
        "algorithms, cuDNN and cuBLAS controls, and inductor's (deterministic mode, "
        "`fallback_random`, no autotuning, no CUDA graphs, where torch has them) · "
        "`none`: nothing",
        default="seeded",
    )
    seed_python: bool = _doc("`random.seed(seed)`", default=True, presets={"none": False})
    seed_numpy: bool = _doc("`np.random.seed(seed)`", default=True, presets={"none": False})
    seed_torch: bool = _doc(
        "`torch.manual_seed(seed)` and `torch.cuda.manual_seed_all(seed)`",
        default=True,
        presets={"none": False},
    )
    pythonhashseed: int | None = _doc(
        "PYTHONHASHSEED set in each run's environment before its "
        "interpreter starts; null: leave the environment's",
        default=0,
        range=(0, 4294967295),
        presets={"none": None},
    )
    dataloader_generator: bool = _doc(
        "a DataLoader built by reprocheck gets a seeded generator "
        "and a worker_init_fn seeding NumPy and random",
        default=True,
        presets={"none": False},
    )
    deterministic_algorithms: bool | str = _doc(
        "`torch.use_deterministic_algorithms`: true, false or `warn`",
        default=False,
        presets={"strict": True},
    )
    cudnn_benchmark: bool | None = _doc(
        "`torch.backends.cudnn.benchmark`; null: as torch has it",
        default=None,
        presets={"strict": False},
    )
    cudnn_deterministic: bool | None = _doc(
        "`torch.backends.cudnn.deterministic`; null: as torch has it",
        default=None,
        presets={"strict": True},
    )
    cublas_workspace: str | None = _doc(
        "CUBLAS_WORKSPACE_CONFIG for each run, e.g. `:4096:8`",
        default=None,
        presets={"strict": ":4096:8"},
    )
    fill_uninitialized_memory: bool | None = _doc(
        "`torch.utils.deterministic.fill_uninitialized_memory`",
        default=None,
        presets={"strict": True},
    )


def _presets() -> dict[str, dict[str, Any]]:
    """Each preset's value of every control, from the fields: ``seeded`` is the defaults."""
    controls = [f for f in dataclasses.fields(DeterminismConfig) if f.name != "preset"]
    return {
        preset: {f.name: f.metadata.get("presets", {}).get(preset, f.default) for f in controls}
        for preset in ("seeded", "strict", "none")
    }


PRESETS: dict[str, dict[str, Any]] = _presets()


@dataclass(frozen=True)
class FactoryConfig:
    """User code that builds something: `module:function` or `file.py:function`."""

    factory: str = _doc(
        "`package.module:function` or `path/to/file.py:function` (relative to "
        "the config's folder) returning an `nn.Module`"
    )
    kwargs: Mapping[str, Any] = _doc(
        "keyword arguments for the factory", default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True)
class DataConfig:
    """The data: a factory returning a Dataset (reprocheck builds the DataLoader) or a
    ready DataLoader / iterable of batches, used as is."""

    factory: str = _doc(
        "`module:function` or `file.py:function` returning a Dataset, a "
        "DataLoader or an iterable of batches; given `seed` if it takes one"
    )
    kwargs: Mapping[str, Any] = _doc(
        "keyword arguments for the factory", default_factory=lambda: MappingProxyType({})
    )
    batch_size: int = _doc("DataLoader batch size", default=32, range=(1, 10**9))
    shuffle: bool = _doc("DataLoader shuffle (with the seeded generator)", default=True)
    num_workers: int = _doc("DataLoader worker processes", default=0, range=(0, 1024))
    drop_last: bool = _doc("DataLoader drop_last", default=False)


@dataclass(frozen=True)
class OptimizerConfig:
    """Any `torch.optim` class by name; every other key is passed to it."""

    name: str = _doc("a class in `torch.optim` (SGD, Adam, AdamW, ...)", default="SGD")
    kwargs: Mapping[str, Any] = _doc(
        "the other keys: lr, momentum, weight_decay, ...",
        default_factory=lambda: MappingProxyType({"lr": 0.01}),
    )


@dataclass(frozen=True)
class DistributedConfig:
    """The config's training under ``torchrun``: each run one job of this many ranks,
    the model in ``DistributedDataParallel`` and the data split by a seeded
    ``DistributedSampler``; compared rank by rank, and replica against replica."""

    nproc_per_node: int = _doc(
        "ranks per job (`torchrun --nproc_per_node`)", default=2, range=(1, 64)
    )
    backend: str = _doc("`gloo` (CPU) or `nccl` (one GPU per rank)", default="gloo")


@dataclass(frozen=True)
class ToleranceConfig:
    """How far legs (devices, thread counts) may be apart: |a−b| ≤ atol + rtol·max(|a|,|b|)
    on each numeric sketch value. Runs within a leg are always compared bitwise."""

    rtol: float = _doc("relative tolerance across legs", default=1e-5, range=(0.0, math.inf))
    atol: float = _doc("absolute tolerance across legs", default=1e-6, range=(0.0, math.inf))


@dataclass(frozen=True)
class Config:
    """One audit."""

    name: str = _doc("the audit's name: report title and output folder prefix")
    seed: int = _doc("the seed every generator is seeded from", default=0, range=(0, 2**63 - 1))
    repeats: int = _doc("runs per leg (`-n`)", default=2, range=(1, 1000))
    steps: int = _doc("optimizer steps per run (`--steps`)", default=20, range=(0, 10**7))
    devices: tuple[str, ...] = _doc(
        "`cpu`, `cuda`, `cuda:N`, `mps`; a leg whose device is absent is skipped with the reason",
        default=("cpu",),
    )
    threads: tuple[int | None, ...] = _doc(
        "`torch.set_num_threads` per leg; omitted: torch's default", default=(None,)
    )
    compile: tuple[bool | None, ...] = _doc(
        "`torch.compile` per leg: `[false, true]` compares eager with compiled (the model "
        "compiled in place, default backend); `--compile off,on`; unset: as built",
        default=(None,),
    )
    environments: tuple[tuple[tuple[str, str], ...], ...] = _doc(
        "environment variables per leg, a list of mappings (`[{}, {ATEN_CPU_CAPABILITY: "
        "default}]`); `{}` is the environment reprocheck runs in; `--env KEY=VALUE` adds one",
        default=((),),
    )
    determinism: DeterminismConfig = _doc("the controls (see below)", default=DeterminismConfig())
    model: FactoryConfig = _doc("the model factory", default=None)  # type: ignore[assignment]
    data: DataConfig = _doc("the data factory and DataLoader settings", default=None)  # type: ignore[assignment]
    optimizer: OptimizerConfig = _doc("the optimizer", default=OptimizerConfig())
    loss: str = _doc(
        "a `torch.nn.functional` loss name or `module:function(output, target)`",
        default="cross_entropy",
    )
    step: str | None = _doc(
        "a custom step `module:function(model, batch, optimizer)` that does "
        "forward, backward and `optimizer.step()` and returns the loss (or "
        "(loss, output))",
        default=None,
    )
    record: tuple[str, ...] = _doc("phases to record", default=PHASES)
    tolerance: ToleranceConfig = _doc(
        "`tolerance: {across_legs: {rtol, atol}}`", default=ToleranceConfig()
    )
    distributed: DistributedConfig | None = _doc(
        "`distributed: {nproc_per_node: 2, backend: gloo}`: train under torchrun (see below)",
        default=None,
    )
    path: str | None = field(default=None, metadata={"internal": True})
    base_dir: str = field(default=".", metadata={"internal": True})
    sha256: str | None = field(default=None, metadata={"internal": True})


def config_to_dict(config: Config) -> dict:
    """JSON-able form; ``config_from_dict(config_to_dict(c))`` rebuilds the same values."""
    det = dataclasses.asdict(config.determinism)
    return {
        "name": config.name,
        "seed": config.seed,
        "repeats": config.repeats,
        "steps": config.steps,
        "devices": list(config.devices),
        "threads": None if config.threads == (None,) else list(config.threads),
        **({"compile": list(config.compile)} if config.compile != (None,) else {}),
        **(
            {"environments": [dict(e) for e in config.environments]}
            if config.environments != ((),)
            else {}
        ),
        "determinism": det,
        "model": {"factory": config.model.factory, "kwargs": dict(config.model.kwargs)},
        "data": {
            "factory": config.data.factory,
            "kwargs": dict(config.data.kwargs),
            "batch_size": config.data.batch_size,
            "shuffle": config.data.shuffle,
            "num_workers": config.data.num_workers,
            "drop_last": config.data.drop_last,
        },
        "optimizer": {"name": config.optimizer.name, **dict(config.optimizer.kwargs)},
        "loss": config.loss,
        "step": config.step,
        "record": list(config.record),
        "tolerance": {
            "across_legs": {"rtol": config.tolerance.rtol, "atol": config.tolerance.atol}
        },
        **(
            {"distributed": dataclasses.asdict(config.distributed)}
            if config.distributed is not None
            else {}
        ),
    }


def config_reference_markdown() -> str:
    """The README's config reference, rendered from the dataclasses' field docs."""
    sections = [
        ("", Config),
        ("determinism.", DeterminismConfig),
        ("model.", FactoryConfig),
        ("data.", DataConfig),
        ("optimizer.", OptimizerConfig),
        ("tolerance.across_legs.", ToleranceConfig),
        ("distributed.", DistributedConfig),
    ]
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for prefix, cls in sections:
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or "doc" not in f.metadata:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = dict(f.default_factory())  # type: ignore[misc]
            else:
                default = "required"
            if dataclasses.is_dataclass(default) or (prefix == "" and f.name in ("model", "data")):
                default = "required" if f.name in ("model", "data") else "see below"
            shown = "null" if default is None else default
            if f.name == "compile":
                shown = "null"
            elif f.name == "environments":  # mappings, given as pairs
                shown = (
                    "["
                    + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e) + "}" for e in default)
                    + "]"
                )
            elif isinstance(shown, tuple):
                shown = "[" + ", ".join("null" if x is None else str(x) for x in shown) + "]"
            lines.append(f"| `{prefix}{f.name}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(lines)
