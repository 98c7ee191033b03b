"""What crosses the process boundary, typed once: the parent (:mod:`reprocheck.parent`, the
audit's process) and the child (:mod:`reprocheck.child`, each run's processes) both import
this module and never each other.

- the *target* — what each run executes: a config's own recipe (:class:`Recipe`), a script
  or any command (:class:`Script`), a function (:class:`Function`), a torchrun job
  (:class:`TorchrunJob`);
- the *run spec* (:class:`RunSpec`) the parent writes for each run, with its capture
  request (:class:`Capture`) when it replays a step;
- the settings a recorded script's own Python children inherit (:class:`ChildSettings`);
- the *process names* of a run's processes (``main``, ``rank0``, ``spawn1``, ``mp1-2``,
  ``sub1``, ``fork1``, nested ``rank0.fork1``) and the trace file of each;
- the environment variables either side reads (named here once), the exit status a run
  gives for a full disk, the key a replay keeps a tensor under.

Every value is a frozen dataclass with a JSON round trip (``to_json``/``from_json``):
the spec is written as JSON by the parent and read back by the child, and the same
version of reprocheck is on both sides (an unknown key is an error, never ignored).
The run's *trace meta* (what the child writes about its run, read by the parent and by
``show``, ``compare`` and ``check``) is :class:`RunMeta`: a trace is also read long after
the run, from a file that may come from anywhere, so reading it keeps only values of the
right kind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar, Union

# ------------------------------------------------------------------ the environment

# "1" (default): every run forks from a warm zygote but run 0 of each leg of a verdict;
# "all": that one too (the test suite's setting); "0": every run in a fresh interpreter
POOL_ENV = "REPROCHECK_POOL"
# a leg run by another Python (``--python PATH``): never a fork of this one's zygote
PYTHON_ENV = "REPROCHECK_PYTHON"
# every process an audit starts carries the audit's token here (the reaper finds them by it)
AUDIT_ENV = "REPROCHECK_AUDIT"
# the pid of the process that started this one from its main thread: die with it
DEATH_ENV = "REPROCHECK_DIE_WITH"
# a recorded script's Python children: the run's :class:`ChildSettings`, as JSON
CHILD_ENV = "REPROCHECK_CHILD"
# a subprocess child's name, given by its parent (``sub1``)
PROCESS_ENV = "REPROCHECK_PROCESS"
# the fingerprint's implementation: xxhash (default) or torch (the device-side digest)
HASHER_ENV = "REPROCHECK_HASHER"
# "0": no as-is pair, canary run or observer run after a reproducible verdict (the tests')
AS_IS_ENV = "REPROCHECK_AS_IS"
CANARY_ENV = "REPROCHECK_CANARY"
OBSERVER_ENV = "REPROCHECK_OBSERVER"
# "1": each run hashes its large tensors on a thread beside training; "0": never; unset:
# where the audit leaves a core free for each run (:func:`reprocheck.parent.launch.hash_beside`)
HASH_THREAD_ENV = "REPROCHECK_HASH_THREAD"

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_count(env: dict[str, str]) -> int | None:
    """The run's thread count, where both :data:`THREAD_VARS` name the same one."""
    values = {env.get(name, "") for name in THREAD_VARS}
    value = values.pop() if len(values) == 1 else ""
    return int(value) if value.isdigit() and int(value) > 0 else None


# what the observer run records: the state alone (no data, outputs, loss or gradients)
OBSERVED = ("weights", "optimizer")
# what a run keeps from step to step: the state, and the generators'
STATE_PHASES = (*OBSERVED, "rng")

# ------------------------------------------------------------------ exit statuses

EXIT_NO_SPACE = 28  # (ENOSPC's number) the launcher reads it as "no space left on device"


# ------------------------------------------------------------------ records and captures


def capture_key(phase: str, tensor: str) -> str:
    """The key a replay keeps a record's tensor under in its ``.pt`` capture."""
    return f"{phase}\t{tensor}"


# ------------------------------------------------------------------ process names

MAIN = "main"
# a process name's last part: its role and its number (``rank0``, ``mp1-2`` → 2)
_ROLES = (
    ("rank", "rank"),
    ("spawn", "spawn"),
    ("mp", "multiprocessing"),
    ("sub", "subprocess"),
    ("fork", "fork"),
)


@dataclass(frozen=True)
class ProcessName:
    """One process of a run, by name: ``main`` (the run's own), or ``rank0``, ``spawn1``,
    ``mp1-2``, ``sub1``, ``fork1``, ``pid123``, nested with dots (``rank0.fork1``)."""

    name: str

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def _parsed(self) -> tuple[str, int | None]:
        """(role, number) of the name's last part: ``mp1-2`` → (multiprocessing, 2)."""
        for prefix, kind in _ROLES:
            tail = self.leaf[len(prefix) :].split("-")[-1]
            if self.leaf.startswith(prefix) and tail.isdigit():
                return kind, int(tail)
        return "script", None

    @property
    def role(self) -> str:
        """rank, spawn, multiprocessing, subprocess, fork; ``script`` for the rest."""
        return self._parsed()[0]

    @property
    def number(self) -> int | None:
        """The rank (rank, spawn) or creation index (the others); None for ``main``."""
        return self._parsed()[1]

    @property
    def rank(self) -> int | None:
        """A torchrun rank's number (``rank3`` → 3), else None."""
        leaf = self.leaf
        return int(leaf[4:]) if leaf.startswith("rank") and leaf[4:].isdigit() else None

    @staticmethod
    def rank_name(rank: int | str) -> str:
        return f"rank{rank}"

    @staticmethod
    def spawn_name(index: int) -> str:
        return f"spawn{index}"

    @staticmethod
    def multiprocessing_name(identity: tuple[int, ...]) -> str:
        return "mp" + "-".join(map(str, identity))

    @staticmethod
    def subprocess_name(index: int) -> str:
        return f"sub{index}"

    @staticmethod
    def fork_name(parent: str | None, index: int) -> str:
        """A bare ``os.fork()`` child: ``fork1``; of a named process, ``rank0.fork1``."""
        return f"{parent}.fork{index}" if parent and parent != MAIN else f"fork{index}"


TRACE_SUFFIX = ".sqlite"


def process_trace(run_trace: str, process: str) -> str:
    """The trace of one of a run's processes: the run's own for ``main``, else
    ``cpu-r0-rank1.sqlite`` beside ``cpu-r0.sqlite``."""
    if process == MAIN:
        return run_trace
    return f"{run_trace[: -len(TRACE_SUFFIX)]}-{process}{TRACE_SUFFIX}"


def child_traces(run_trace: str) -> dict[str, str]:
    """The traces a run's child processes wrote beside its own (``<run>-<name>.sqlite``):
    name → path, in natural name order (``mp2`` before ``mp10``)."""
    stem = run_trace[: -len(TRACE_SUFFIX)] + "-"
    folder = os.path.dirname(run_trace) or "."
    try:
        entries = sorted(os.listdir(folder), key=_natural)
    except OSError:
        return {}
    found = {}
    for entry in entries:
        path = os.path.join(folder, entry)
        if path.startswith(stem) and entry.endswith(TRACE_SUFFIX):
            found[path[len(stem) : -len(TRACE_SUFFIX)]] = path
    return found


def _natural(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def run_stem(trace: str) -> str:
    """``cpu-r0`` of ``…/cpu-r0.sqlite`` (a replay's: ``cpu-r0.replay-s1``)."""
    return os.path.basename(trace)[: -len(TRACE_SUFFIX)]


class _Json:
    """A value that crosses as the JSON object of its fields (a nested value as its own)."""

    def to_json(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_json(cls: type[_J], data: dict[str, Any]) -> _J:
        return _from_plain(cls, data)


_J = TypeVar("_J", bound=_Json)


# ------------------------------------------------------------------ the target


@dataclass(frozen=True)
class _Target:
    kind: ClassVar[str] = ""
    # a script's run ends after this many steps (None: the script's own length)
    max_steps: int | None = None
    # a sub-audit's runs carry its folder's name in ``{run}`` (``as-is-cpu-r0``)
    run_prefix: str = ""

    @property
    def is_script(self) -> bool:
        """Does each run execute the user's code unchanged (not a config's recipe)?"""
        return self.kind != "recipe"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **_plain(self)}

    def with_steps(self, max_steps: int | None) -> Target:
        return replace(self, max_steps=max_steps)  # type: ignore[return-value]

    def prefixed(self, prefix: str) -> Target:
        return replace(self, run_prefix=self.run_prefix + prefix)  # type: ignore[return-value]

    def shown(self) -> list[str]:
        """The command as the report shows it."""
        return []


@dataclass(frozen=True)
class Recipe(_Target):
    """A config's own training recipe (:mod:`reprocheck.child.loop`)."""

    kind: ClassVar[str] = "recipe"


@dataclass(frozen=True)
class Script(_Target):
    """A script, module, notebook or any command, unchanged.

    ``argv``: what this interpreter runs — ``[path, ARGS…]``, ``["-m", module, ARGS…]``, a
    notebook's ``[path, ARGS…]`` (``notebook``), or, for any other command (``launch``:
    ``bash run.sh``, ``srun …``, ``accelerate launch …``), the command itself, run as a
    subprocess whose Python processes record themselves. ``command``: as the user gave it.
    """

    kind: ClassVar[str] = "script"
    argv: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    launch: bool = False
    notebook: bool = False

    def shown(self) -> list[str]:
        if self.command:
            return list(self.command)
        return ["python", *self.argv] if self.argv else []


@dataclass(frozen=True)
class TorchrunJob(Script):
    """``torchrun … train.py``: one job per run, its ranks compared rank by rank."""

    kind: ClassVar[str] = "torchrun"
    nproc_per_node: int = 1
    fixed_port: bool = False  # the job names its own rendezvous port (runs cannot overlap)


@dataclass(frozen=True)
class Function(_Target):
    """``reprocheck.audit(fn)``: a function, ``module:name`` or ``path.py:name``."""

    kind: ClassVar[str] = "function"
    function: str = ""


Target = Union[Recipe, Script, TorchrunJob, Function]
_TARGETS: dict[str, type] = {t.kind: t for t in (Recipe, Script, TorchrunJob, Function)}


def target_from_json(data: dict[str, Any]) -> Target:
    data = dict(data)
    kind = _TARGETS.get(data.pop("kind", None))
    if kind is None:
        raise ValueError(f"unknown target kind in {data!r}")
    return _from_plain(kind, data)


# ------------------------------------------------------------------ the run spec


@dataclass(frozen=True)
class Capture(_Json):
    """A replay's request: run to ``step`` and keep the named records' tensors in ``out``
    (``.pt``); with ``ops``, every aten op of the step too (``out.ops.json``)."""

    step: int
    tensors: tuple[tuple[str, str], ...]
    out: str
    ops: bool = False
    process: str = MAIN  # the process whose step is captured (a script's child)
    backend: str | None = None  # a compiled leg's replay through this backend (the ladder)
    resume: str | None = None  # start from this checkpoint (a config's run)


@dataclass(frozen=True)
class CheckpointPlan(_Json):
    """Where a config's run saves the states its replays may resume from."""

    every: int
    keep: int
    prefix: str
    runs: int = 1


@dataclass(frozen=True)
class Canary(_Json):
    """The canary run: one bit of one trained tensor flipped right before ``step``'s
    weights are recorded (:mod:`reprocheck.canary`; what was flipped: the trace's meta)."""

    step: int


@dataclass(frozen=True)
class Recording(_Json):
    """How a verdict's runs record their steps (``--record``, ``--every``): ``full`` (one
    digest per tensor) or ``sparse`` (one digest per phase: every tensor of the phase
    folded in record order, so a change anywhere changes it); with ``every`` M, only
    every M-th step (and the last) is hashed at all. Replays always record in full."""

    mode: str = "full"
    every: int | None = None

    @property
    def plain(self) -> bool:
        """One digest per tensor at every step: what every reader of traces reads."""
        return self.mode == "full" and self.every is None

    def describe(self) -> str:
        """``sparse``, ``sparse, every 10 steps``, ``every 10 steps``."""
        parts = [self.mode] if self.mode != "full" else []
        if self.every is not None:
            parts.append(f"every {self.every} steps")
        return ", ".join(parts) or "full"

    @classmethod
    def of(cls, value: Any) -> Recording:
        """A trace's ``meta.recording`` (any value: a hostile trace's reads as full)."""
        if not isinstance(value, dict):
            return cls()
        mode = value.get("mode") if value.get("mode") in RECORD_MODES else "full"
        every = value.get("every")
        ok = isinstance(every, int) and not isinstance(every, bool) and every > 0
        return cls(mode, every if ok else None)


RECORD_MODES = ("full", "sparse")
PHASE_DIGEST = "*"  # a sparse trace's record name: every tensor of its phase, folded


@dataclass(frozen=True)
class ResumeRun(_Json):
    """A run of a resume audit (``reprocheck resume``): where it runs, when it stops, what
    its control disturbs. Its checkpoint saves and loads are noted in its trace's meta."""

    cwd: str | None = None  # its own working directory (made if missing)
    # stop at the next step boundary after the first checkpoint saved at a step ≥ this
    stop_after_save: int | None = None
    # the control: this part of the state disturbed after the load, before the first
    # training forward — rng (generators re-seeded from entropy), optimizer (its state
    # zeroed), data (the first training batch skipped)
    disturb: str | None = None
    # a config's resumed run (``run --resume-at K``): it starts from this checkpoint of
    # reprocheck's own
    start_from: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run, as the parent hands it to :mod:`reprocheck.child.worker`."""

    config: dict[str, Any]  # the audit's config (``config_to_dict``)
    config_path: str | None
    base_dir: str
    leg: str
    device: str
    threads: int | None
    compile: bool | None  # None: no compile setting (a script's torch.compile as written)
    run: int
    steps: int
    trace: str
    target: Target = field(default_factory=Recipe)
    with_sketch: bool = False
    depth: str = "step"
    checkpoints: CheckpointPlan | None = None
    capture: Capture | None = None
    canary: Canary | None = None
    observer: bool = False  # records the state alone (it must end where the others do)
    resume_run: ResumeRun | None = None  # a run of ``reprocheck resume``
    recording: Recording | None = None  # sparse or sampled records (a verdict's runs)
    hash_thread: bool = False  # large tensors hashed beside training (the same digests)

    def to_json(self) -> dict[str, Any]:
        out = _plain(self)
        out["target"] = self.target.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        data = dict(data)
        target = target_from_json(data.pop("target"))
        return replace(_from_plain(cls, data), target=target)

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1)

    @classmethod
    def read(cls, path: str) -> RunSpec:
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))

    @property
    def meta(self) -> dict[str, Any]:
        """What every trace says about its run (its ``meta``), from this spec."""
        return {
            "config": self.config,
            "config_path": self.config_path,
            "leg": self.leg,
            "run": self.run,
            "device": self.device,
            "threads": self.threads,
            "steps_planned": self.steps,
            **(
                {"recording": self.recording.to_json()}
                if self.recording is not None and not self.recording.plain
                else {}
            ),
            **({"hash_thread": True} if self.hash_thread else {}),
        }


@dataclass(frozen=True)
class ChildSettings(_Json):
    """A recorded script's run as its processes (the main one, and each Python child it
    starts, through :data:`CHILD_ENV`) need it."""

    trace: str
    meta: dict[str, Any]
    controls: dict[str, Any]  # the DeterminismConfig's fields
    seed: int
    applied: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None
    with_sketch: bool = False
    threads: int | None = None
    capture: Capture | None = None
    compile: bool | None = None
    # a compiled leg's replay down the ladder: its torch.compile calls use this backend
    compile_backend: str | None = None
    canary: Canary | None = None  # every process flips one bit before this step's weights
    record: tuple[str, ...] | None = None  # the phases recorded (the observer's), else all
    rng_start: dict[str, Any] | None = None  # a child's generators as it found them
    resume_run: ResumeRun | None = None  # a run of ``reprocheck resume`` (its saves noted)

    @property
    def config(self) -> dict[str, Any] | None:
        """The audited config (``config_to_dict``), as the run's meta carries it."""
        return self.meta.get("config")

    def export(self) -> str:
        return json.dumps(self.to_json(), default=str)

    @classmethod
    def imported(cls, text: str) -> ChildSettings:
        return cls.from_json(json.loads(text))


# ------------------------------------------------------------------ the trace's meta


@dataclass(frozen=True)
class RunMeta:
    """What a run's trace says about it (its ``meta`` table), as the parent and the readers
    of traces use it. Written by the child (:mod:`reprocheck.child`), read back from a file
    that may come from anywhere: :meth:`of` keeps a value only where it has the field's
    JSON kind (anything else reads as absent); the trace reader has already refused the
    values whose kind ``show``/``compare``/``check`` depend on (``reprocheck.trace``)."""

    # the run
    schema: str | None = None
    schema_version: int | None = None
    status: str | None = None  # complete | failed | stopped; None: running, or killed
    error: str | None = None
    error_kind: str | None = None  # "config" (exit 2) …
    failed_at: float | None = None
    config: dict[str, Any] | None = None
    config_path: str | None = None
    leg: str | None = None
    run: int | None = None
    device: Any = None  # a string, or a list of strings (a process on several devices)
    threads: int | None = None
    steps_planned: int | None = None
    command: list[str] | None = None
    hasher: str | None = None
    environment: dict[str, Any] | None = None
    packages: dict[str, Any] | None = None
    golden: dict[str, Any] | None = None
    # the process (a script's child processes)
    process: str | None = None
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    distributed: dict[str, Any] | None = None  # the process group: buffers, sync_buffers …
    # what the script did (the rules read it)
    rng_start: dict[str, Any] | None = None  # each generator's state digest at its start
    seeding: list[Any] | None = None  # its seeding calls, with their lines
    observations: list[Any] | None = None  # what a rule names (by its name), with its line
    written: list[Any] | None = None  # files it opened for writing
    effective: dict[str, Any] | None = None  # controls in effect at its first step
    overrides: list[Any] | None = None  # its own calls that set a control
    exec: dict[str, Any] | None = None  # what each name prefix stands for (models …)
    # compile
    compiled: bool | None = None
    compile_settings: dict[str, Any] | None = None
    compile_cache_warm: bool | None = None
    compile_options: list[Any] | None = None
    dynamo_graphs: dict[str, Any] | None = None
    # the canary run: what it flipped
    canary: dict[str, Any] | None = None
    # a resume audit's run: its checkpoint saves (step, file, writer, keys), the files it
    # loaded, the step it stopped after a save at, what its control disturbed
    saves: list[Any] | None = None
    loads: list[Any] | None = None
    stopped_after_save: int | None = None
    disturbed: dict[str, Any] | None = None
    # sparse or sampled records (``Recording``'s JSON); absent: one digest per tensor, each step
    recording: dict[str, Any] | None = None
    # its large tensors were hashed on a thread beside training (digests are the same)
    hash_thread: bool | None = None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> RunMeta:
        values = {}
        for name, kinds in _META_KINDS.items():
            value = meta.get(name)
            if value is not None and (kinds is None or _fits(value, kinds)):
                values[name] = value
        return cls(**values)


def _fits(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is no number
    return isinstance(value, kinds)


_KINDS_OF = {
    "str | None": (str,),
    "int | None": (int,),
    "float | None": (int, float),
    "bool | None": (bool,),
    "dict[str, Any] | None": (dict,),
    "list[str] | None": (list,),
    "list[Any] | None": (list,),
    "Any": None,
}
_META_KINDS: dict[str, tuple[type, ...] | None] = {
    f.name: _KINDS_OF[str(f.type)] for f in fields(RunMeta)
}


# ------------------------------------------------------------------ the JSON round trip

_NESTED: dict[str, Any] = {
    "capture": Capture,
    "checkpoints": CheckpointPlan,
    "canary": Canary,
    "resume_run": ResumeRun,
    "recording": Recording,
}
_TUPLES = {"argv", "command", "record"}


def _plain(value: Any) -> dict[str, Any]:
    out = {}
    for f in fields(value):
        item = getattr(value, f.name)
        if hasattr(item, "to_json"):
            item = item.to_json()
        elif isinstance(item, tuple):
            item = [list(x) if isinstance(x, tuple) else x for x in item]
        out[f.name] = item
    return out


def _from_plain(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    values = {}
    for name, item in data.items():
        if name in _NESTED and isinstance(item, dict):
            item = _NESTED[name].from_json(item)
        elif name == "tensors" and item is not None:
            item = tuple(tuple(x) for x in item)
        elif name in _TUPLES and isinstance(item, list):
            item = tuple(item)
        values[name] = item
    return cls(**values)


__all__ = [
    "AS_IS_ENV",
    "AUDIT_ENV",
    "CANARY_ENV",
    "CHILD_ENV",
    "DEATH_ENV",
    "EXIT_NO_SPACE",
    "HASHER_ENV",
    "MAIN",
    "OBSERVED",
    "OBSERVER_ENV",
    "PHASE_DIGEST",
    "POOL_ENV",
    "PROCESS_ENV",
    "PYTHON_ENV",
    "RECORD_MODES",
    "STATE_PHASES",
    "Canary",
    "Capture",
    "CheckpointPlan",
    "ChildSettings",
    "Function",
    "ProcessName",
    "Recipe",
    "Recording",
    "ResumeRun",
    "RunMeta",
    "RunSpec",
    "Script",
    "Target",
    "TorchrunJob",
    "capture_key",
    "child_traces",
    "process_trace",
    "run_stem",
    "target_from_json",
    "thread_count",
]
