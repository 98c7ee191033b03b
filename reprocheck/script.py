"""A training script as the target of a command: ``… -- python train.py ARGS``.

``exec``, ``doctor``, ``record`` and ``check`` all take one; this module turns the words
after ``--`` into the audit's :class:`~reprocheck.config.Config` (the script stands where
a config's factories would) and the ``exec`` target each run executes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .contract import Script, TorchrunJob


class ScriptError(Exception):
    """The words after ``--`` do not name a Python script (a usage error, exit 2)."""


def is_interpreter(word: str) -> bool:
    """``python``, ``python3``, ``/usr/bin/python3.12``: a Python interpreter's name."""
    return os.path.basename(word).startswith("python")


TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def is_torchrun(words: list[str]) -> bool:
    """``torchrun …`` or ``python -m torch.distributed.run …``."""
    if words and os.path.basename(words[0]) == "torchrun":
        return True
    return len(words) > 2 and words[1] == "-m" and words[2] in TORCHRUN_MODULES


@dataclass(frozen=True)
class Torchrun:
    """What the audit needs of a ``torchrun`` command line (torch's own parser reads it)."""

    nproc_per_node: int | None  # None: not a number (``gpu``, ``auto``)
    fixed_port: bool  # a static rendezvous port: the job's repeats run one at a time
    script: str | None  # the training script's absolute path (None: ``-m module``)
    name: str


def parse_torchrun(args: list[str], command: str) -> Torchrun:
    """Read torchrun's options with torchrun's own parser (its errors are usage errors)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        raise ScriptError(f"torchrun: {message}")

    parser.error = error  # type: ignore[method-assign]
    try:
        parsed = parser.parse_args(args)
    except SystemExit:  # --help and the like
        raise ScriptError(f"torchrun options not understood: {' '.join(args)}") from None
    if parsed.no_python:
        raise ScriptError("torchrun --no-python runs no Python script: give the script")
    endpoint = parsed.rdzv_endpoint or ""
    port = endpoint.rsplit(":", 1)[1] if ":" in endpoint else ""
    fixed = not parsed.standalone and port != "0"
    nproc = int(parsed.nproc_per_node) if str(parsed.nproc_per_node).isdigit() else None
    if parsed.module:
        return Torchrun(nproc, fixed, None, parsed.training_script)
    script = os.path.abspath(parsed.training_script)
    if not os.path.isfile(script):
        raise ScriptError(f"no such script: {parsed.training_script}")
    return Torchrun(nproc, fixed, script, Path(script).stem)


NOTEBOOK_RUNNERS = ("ipython", "jupyter", "jupyter-nbconvert", "jupyter-execute")


def _notebook_words(words: list[str]) -> str | None:
    """The notebook a command runs, in any of its front doors: ``nb.ipynb``, ``ipython
    nb.ipynb``, ``python -m IPython nb.ipynb``, ``jupyter nbconvert --execute nb.ipynb``,
    ``jupyter execute nb.ipynb``, ``python -m nbconvert --execute nb.ipynb``. None where
    the command is no notebook's."""
    if not words:
        return None
    program = os.path.basename(words[0])
    runner = program in NOTEBOOK_RUNNERS or (
        is_interpreter(words[0])
        and len(words) > 2
        and words[1] == "-m"
        and words[2] in ("IPython", "nbconvert", "jupyter", "nbclient")
    )
    notebooks = [w for w in words if w.lower().endswith(".ipynb")]
    if words[0].lower().endswith(".ipynb") or (runner and notebooks):
        return words[0] if words[0].lower().endswith(".ipynb") else notebooks[0]
    return None


def _ipython_script(words: list[str]) -> list[str] | None:
    """``ipython train.py ARGS`` / ``python -m IPython train.py ARGS`` → ``python train.py
    ARGS`` (IPython runs a ``.py`` file as plain Python): the audit is the script's."""
    if words and os.path.basename(words[0]) == "ipython":
        rest = words[1:]
    elif len(words) > 2 and is_interpreter(words[0]) and words[1:3] == ["-m", "IPython"]:
        rest = words[3:]
    else:
        return None
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if rest and rest[0].endswith(".py"):
        return ["python", *rest]
    return None


def launch_path() -> str:
    """The ``PATH`` a launched command runs with: this interpreter's folder first, so
    ``python``, ``torchrun`` and ``accelerate`` in it are the ones reprocheck runs with."""
    here = os.path.dirname(sys.executable)
    return os.pathsep.join(p for p in (here, os.environ.get("PATH")) if p)


def _named_file(words: list[str]) -> str | None:
    """The file a launcher's command runs, that the audit is named after: its first
    argument that is a Python script, else the first that is a file (``run.sh``)."""
    files = [w for w in words[1:] if not w.startswith("-") and os.path.isfile(w)]
    scripts = [w for w in files if w.endswith(".py")]
    found = scripts or files
    return os.path.abspath(found[0]) if found else None


def parse(words: list[str], command: str) -> tuple[list[str], str | None, str]:
    """``python train.py ARGS`` → (the run's argv without the interpreter, the script's
    absolute path or None for ``-m pkg``, the audit's name). ``torchrun OPTIONS train.py
    ARGS`` runs as ``python -m torch.distributed.run OPTIONS train.py ARGS``: the script
    is the training script torchrun starts in every rank. A notebook or another launcher
    is :func:`target_of`'s."""
    usage = f"reprocheck {command} [OPTIONS] -- python train.py ARGS"
    if words and os.path.basename(words[0]) == "torchrun":
        words = ["python", "-m", "torch.distributed.run", *words[1:]]
    if not words or not is_interpreter(words[0]):
        raise ScriptError(f"{command} runs a Python script: {usage}")
    argv = list(words[1:])  # the run's own interpreter (this one) replaces `python`
    if not argv:
        raise ScriptError(f"no script given: {usage}")
    if argv[0] == "-m":
        if len(argv) < 2:
            raise ScriptError(
                f"-m needs a module name: reprocheck {command} -- python -m pkg.train"
            )
        if argv[1] in TORCHRUN_MODULES:
            job = parse_torchrun(argv[2:], command)
            return argv, job.script, job.name
        return argv, None, argv[1]
    if argv[0].startswith("-"):
        raise ScriptError(f"python option {argv[0]} is not supported: give the script")
    if argv[0].lower().endswith(".ipynb"):
        raise ScriptError(
            f"{argv[0]} is a notebook, not a Python script: "
            f"reprocheck {command} -- {argv[0]} runs its code cells"
        )
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise ScriptError(f"no such script: {argv[0]}")
    argv[0] = script
    return argv, script, Path(script).stem


def target_of(words: list[str], command: str) -> tuple[Script, str | None, str]:
    """The words after ``--`` → (the target each run executes, the file whose content identifies
    the audit, the audit's name). A Python script (or ``-m`` module, or torchrun job) runs
    in the run's own process; a notebook's code cells run there in order
    (:mod:`reprocheck.notebook`); any other command (``bash run.sh``, ``accelerate launch
    train.py``, ``srun …``, ``mpirun …``, ``deepspeed …``) runs as the run's child, and every
    Python process it starts that trains is recorded through the environment."""
    usage = f"reprocheck {command} [OPTIONS] -- python train.py ARGS (or any command)"
    if not words:
        raise ScriptError(f"no command given: {usage}")
    notebook = _notebook_words(words)
    if notebook is not None:
        path = os.path.abspath(notebook)
        if not os.path.isfile(path):
            raise ScriptError(f"no such notebook: {notebook}")
        rest = words[words.index(notebook) + 1 :] if words[0] == notebook else []
        return Script(argv=(path, *rest), notebook=True), path, Path(path).stem
    words = _ipython_script(words) or words
    program = os.path.basename(words[0])
    if is_interpreter(words[0]) or program == "torchrun":
        argv, script, name = parse(words, command)
        return Script(argv=tuple(argv)), script, name
    if program.lower().endswith(".py"):
        raise ScriptError(
            f"run a script with its interpreter: reprocheck {command} -- python {words[0]} …"
        )
    found = shutil.which(words[0], path=launch_path())
    if found is None:
        raise ScriptError(f"no such command: {words[0]}")
    file = _named_file(words)
    name = Path(file).stem if file else program
    return Script(argv=(found, *words[1:]), launch=True), file, name


def script_config(
    words: list[str],
    command: str,
    *,
    repeats: int = 2,
    steps: int | None = None,
    preset: str = "seeded",
    seed: int = 0,
) -> tuple[Any, Script]:
    """(the audit's Config, the target each run executes) for ``python train.py ARGS``."""
    from .config import PRESETS, Config, DataConfig, DeterminismConfig, FactoryConfig

    target, script, name = target_of(words, command)
    argv = target.argv
    if preset not in PRESETS:
        raise ScriptError(f"--preset takes {', '.join(PRESETS)} (got {preset!r})")
    if target.notebook:
        from .notebook import code_sha256

        sha = code_sha256(script)
    else:
        sha = hashlib.sha256(Path(script).read_bytes()).hexdigest() if script else None
    config = Config(
        name=name,
        seed=seed,
        repeats=repeats,
        steps=steps or 0,
        determinism=DeterminismConfig(preset=preset, **PRESETS[preset]),
        model=FactoryConfig(factory="exec"),
        data=DataConfig(factory="exec"),
        path=script or name,
        base_dir=os.getcwd(),
        sha256=sha,
    )
    target = replace(target, max_steps=steps)
    if target.launch or target.notebook:
        target = replace(target, command=tuple(words))  # as the user gave it
    if argv[0] == "-m" and argv[1] in TORCHRUN_MODULES:
        job = parse_torchrun(list(argv[2:]), command)
        target = TorchrunJob(
            argv=target.argv,
            max_steps=steps,
            command=tuple(words),  # as the user gave it (`torchrun …`)
            nproc_per_node=job.nproc_per_node,
            fixed_port=job.fixed_port,
        )
    return config, target


def resolve_target(
    config_path: Path | None, extra: list[str], command: str, **script: Any
) -> tuple[Any, Script | None]:
    """A command's target: ``CONFIG`` (a YAML config) or ``-- python train.py ARGS`` (then
    click hands over ``python`` as CONFIG and the rest as extra arguments). Returns the
    Config and, for a script, the target each run executes."""
    usage = f"reprocheck {command} CONFIG, or reprocheck {command} -- python train.py ARGS"
    yaml = config_path is not None and Path(config_path).suffix.lower() in (".yaml", ".yml")
    word = str(config_path) if config_path is not None else ""
    if (
        config_path is not None
        and not yaml
        and (
            extra
            or is_interpreter(word)
            or Path(word).suffix.lower() == ".ipynb"
            or (shutil.which(word) is not None and not os.path.isfile(word))
        )
    ):
        # `-- python train.py`, `-- nb.ipynb`, `-- bash run.sh`, `-- accelerate launch …`
        # (a file alone, `-- train.py`, stands where a config goes: said to be a script)
        return script_config([word, *extra], command, **script)
    if config_path is None:
        raise ScriptError(f"give a config or a script: {usage}")
    if extra:
        raise ScriptError(f"unexpected arguments {' '.join(extra)!r} after CONFIG: {usage}")
    from .configfile import load_config

    return load_config(config_path), None


def distributed_target(config: Any) -> TorchrunJob:
    """The target of a config with ``distributed:``: each run one torchrun job of
    :mod:`reprocheck.child.ddp` on the config's file."""
    if not config.path:
        raise ScriptError("a distributed config must be a file (torchrun reads it in each rank)")
    d = config.distributed
    job = ["--standalone", "--nproc_per_node", str(d.nproc_per_node)]
    module = ["-m", "reprocheck.child.ddp", os.path.abspath(config.path), "--backend", d.backend]
    return TorchrunJob(
        argv=("-m", "torch.distributed.run", *job, *module),
        max_steps=config.steps or None,
        command=("torchrun", *job, *module),
        nproc_per_node=d.nproc_per_node,
        fixed_port=False,
    )
