"""An audit's options, however it is started: their defaults, once, and the one way they
become the config's overrides and the :class:`~reprocheck.parent.audit.AuditOptions`.

Every entrance goes through :func:`audit_setup`: the commands ``run``, ``exec``,
``record``, ``check`` and ``doctor`` (their flags, declared once, are "the shared
options" in :mod:`reprocheck.cli`; :meth:`LegOptions.from_cli` reads them back),
:func:`reprocheck.audit` and the pytest plugin. Importing this module imports neither
typer nor the runner nor torch: ``--help`` and a usage error stay fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError

if TYPE_CHECKING:
    from .contract import Target
    from .parent.audit import AuditOptions


def _config_field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(Config) if f.name == name)


DEFAULT_OUT = "reports"  # the folder each audit makes its own folder in (--out)
DEPTHS = ("step", "module", "op")  # what each run records (--depth); the first: the default
DEFAULT_REPEATS: int = _config_field("repeats").default  # runs per leg of a script (-n)
REPEATS_RANGE: tuple[int, int] = _config_field("repeats").metadata["range"]


@dataclasses.dataclass(frozen=True)
class LegOptions:
    """What each run of an audit is and where it goes: the legs (devices × threads ×
    compile × environments), the runs per leg and their steps, what they record, the
    folder, the parallelism and the time a run may take. None: the config's own."""

    repeats: int | None = None
    steps: int | None = None
    devices: tuple[str, ...] | None = None
    threads: tuple[int, ...] | None = None
    env: tuple[str, ...] = ()  # KEY=VALUE: one more leg with these variables set
    compile: tuple[str, ...] = ()  # off, on, off,on
    python: tuple[str, ...] = ()  # one more leg per interpreter
    depth: str = DEPTHS[0]
    record: str = "full"  # full | sparse: one digest per tensor, or per phase
    every: int | None = None  # hash every M-th step (and the last) only
    out: str = DEFAULT_OUT
    jobs: int | None = None
    timeout: float | None = None

    @classmethod
    def from_cli(cls, params: Mapping[str, Any], **given: Any) -> LegOptions:
        """The leg options as a command parsed them (``ctx.params``, named as the shared
        options are in :mod:`reprocheck.cli`): ``--device cpu,cuda`` and ``--threads 1,2``
        split at their commas. ``given`` replaces some (the ``repeats`` ``--max-rate``
        asked for)."""
        parsed = {
            "repeats": params["repeats"],
            "steps": params["steps"],
            "devices": _split(params["device"]),
            "threads": _thread_counts(params["threads"]),
            "env": tuple(params["env"] or ()),
            "compile": tuple(params["compile_"] or ()),
            "python": tuple(params["python"] or ()),
            "depth": params["depth"],
            "record": params["record"],
            "every": params["every"],
            "out": params["out"],
            "jobs": params["jobs"],
            "timeout": params["timeout"],
        }
        return cls(**{**parsed, **given})


def _split(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """``["cpu,cuda", "mps"]`` → ``("cpu", "cuda", "mps")``; nothing given: None."""
    items = tuple(item.strip() for value in values or () for item in value.split(","))
    items = tuple(item for item in items if item)
    return items or None


def _thread_counts(values: Iterable[str] | None) -> tuple[int, ...] | None:
    items = _split(values)
    if items is None:
        return None
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError(
            f"--threads takes whole numbers, e.g. --threads 1,2 (got {','.join(items)})"
        ) from None


def audit_setup(
    config: Config, legs: LegOptions, target: Target | None = None, **audit: Any
) -> tuple[Config, AuditOptions]:
    """(the config with the leg options over it, validated like its YAML; the audit's
    options). ``target``: what each run executes (None: the config's own recipe); a
    script's runs stop after ``legs.steps``. ``audit``: the rest of the AuditOptions
    (``fail_fast``, ``measure``, ``zoom``, ``attribute``, ``golden`` …), their defaults
    where not given."""
    from .configfile import apply_overrides
    from .contract import RECORD_MODES, Recipe, Recording
    from .parent.audit import AuditOptions

    config = apply_overrides(
        config,
        repeats=legs.repeats,
        steps=legs.steps,
        devices=None if legs.devices is None else list(legs.devices),
        threads=None if legs.threads is None else list(legs.threads),
        env=list(legs.env),
        compile=list(legs.compile),
        python=list(legs.python),
    )
    if legs.depth not in DEPTHS:
        raise ConfigError(f"--depth takes step, module or op (got {legs.depth!r})")
    target = target if target is not None else Recipe()
    if target.is_script:
        if legs.depth != DEPTHS[0]:
            raise ConfigError(
                f"--depth {legs.depth} records inside a config's own loop: a script's runs "
                "are recorded step by step (after a divergence its step is replayed op by op)"
            )
        if legs.steps is not None:  # a script stops after its K-th step
            target = target.with_steps(legs.steps)
    if legs.record not in RECORD_MODES:
        raise ConfigError(f"--record takes {' or '.join(RECORD_MODES)} (got {legs.record!r})")
    recording = Recording(legs.record, legs.every)
    legs_planned = (
        len(config.devices) * len(config.threads) * len(config.compile) * len(config.environments)
    )
    if not recording.plain and legs_planned > 1:
        raise ConfigError(
            "--record sparse and --every compare runs bit for bit within one leg: legs are "
            "compared under a tolerance, tensor by tensor (drop --threads/--device/--compile/"
            "--env/--python legs, or record in full)"
        )
    if not recording.plain and legs.depth != DEPTHS[0]:
        raise ConfigError(
            f"--record {legs.record} --every: each step's phases, not --depth {legs.depth}"
        )
    options = AuditOptions(
        recording=recording,
        out=legs.out,
        jobs=legs.jobs,
        timeout=legs.timeout,
        depth=legs.depth,
        target=target,
        **audit,
    )
    return config, options
