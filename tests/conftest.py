"""Shared helpers: run the real CLI in a child process, read its JSON report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from reprocheck.parent import pool

from .strict_json import load_strict

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Timings and thread-sensitive numerics: one thread unless a test is about threads.
torch.set_num_threads(1)

# The audited runs fork from the warm pool too (runner/pool.py): each test is about what it
# asserts, not about how a run's process starts. The tests of the pool itself, and every
# run whose hash seed is random, start fresh interpreters (tests/test_pool.py says which).
os.environ.setdefault("REPROCHECK_POOL", "all")
# The pool keeps MAX_ZYGOTES warm servers, one per start-up environment (thread count,
# hash seed, the variables below …), and stops the least recently used beyond that. A test
# session meets many more environments than an audit does, module after module: with room
# for the common ones (a config's and a script's, at 1 and 2 threads) beside the rest, each
# starts once per session instead of again after every few modules (~3 s a start).
pool.MAX_ZYGOTES = max(pool.MAX_ZYGOTES, 8)

# The as-is pair after a reproducible verdict (two more runs, no preset) is on for users;
# the tests of it turn it on (tests/test_entrances.py), the rest are about their verdict.
os.environ.setdefault("REPROCHECK_AS_IS", "0")
# So are the canary and observer runs after one (tests/test_canary.py turns them on).
os.environ.setdefault("REPROCHECK_CANARY", "0")
os.environ.setdefault("REPROCHECK_OBSERVER", "0")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    fresh: bool = False,
) -> CliResult:
    """``reprocheck ARGS``; if ``--json PATH`` was given, the parsed report.

    In this process (typer's runner: the same parsing, rendering and exit codes, without a
    new interpreter importing torch), unless ``fresh``: then ``python -m reprocheck`` in a
    child process (what a test of start-up, signals or the terminal's width needs)."""
    if fresh:
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p
        )
        proc = subprocess.run(
            [sys.executable, "-m", "reprocheck", *args],
            capture_output=True,
            text=True,
            cwd=cwd or ROOT,
            env=full_env,
            timeout=timeout,
        )
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        code, stdout, stderr = _run_in_process(list(args), cwd or ROOT, env or {})
    report = None
    if "--json" in args:
        path = Path(args[args.index("--json") + 1])
        if not path.is_absolute():
            path = (cwd or ROOT) / path
        if str(path) != "-" and path.exists():
            report = load_strict(path)
    return CliResult(code, stdout, stderr, report)


def _run_in_process(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from reprocheck import cli

    before = os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli.app, args)
    finally:
        os.chdir(before)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cli._state["debug"] = False
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # what a child process would have printed: the traceback the CLI must never show
        error = result.exception
        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(type(error), error, error.__traceback__)
        )
    return result.exit_code, result.stdout, stderr


def run_exec(
    out: Path,
    report: Path,
    command: tuple[str, ...],
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
):
    """``reprocheck exec -n 2 -q --out OUT --json REPORT OPTIONS -- python COMMAND``;
    without attribution unless OPTIONS ask for it (``--attribute``): a test of it says so."""
    if "--attribute" not in options:
        options = ("--no-attribute", *options)
    result = run_cli(
        "exec", "-n", "2", "-q", "--out", str(out), "--json", str(report), *options,
        "--", "python", *command, env=env,
    )  # fmt: skip
    assert result.report is not None, result.stderr
    return result


SCRIPTS = ROOT / "tests" / "scripts"


def script_line(script: str, text: str) -> str:
    """``tests/scripts/<script>:<line>`` of the first line holding ``text``."""
    lines = (SCRIPTS / script).read_text().splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if text in line)
    return f"tests/scripts/{script}:{number}"


class ScriptAudits:
    """``reprocheck exec`` of a script of tests/scripts/, each distinct command once per
    test module (a module-scoped fixture holds one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)  # --json's folder must exist (preflight)
        self.done: dict[tuple[str, ...], CliResult] = {}

    def __call__(
        self,
        script: str,
        *args: str,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> CliResult:
        key = (script, *args, "|", *options, "|", *sorted((env or {}).items()))
        if key not in self.done:
            index = len(self.done)
            self.done[key] = run_exec(
                self.folder / f"out{index}",
                self.folder / f"r{index}.json",
                (str(SCRIPTS / script), *args),
                options,
                env,
            )
        return self.done[key]


# `--preset none` (and the as-is pair) leave PYTHONHASHSEED as the environment has it. Unset,
# each run needs an interpreter of its own (a random hash seed cannot fork from the warm
# pool); set, the runs fork, and a fork draws its generators from entropy as a fresh
# interpreter does (tests/test_pool.py). The tests whose answer does not hang on the hash
# seed set it; the tests of a hash-seed dependence leave it unset.
FIXED_HASH_SEED = {"PYTHONHASHSEED": "0"}


@pytest.fixture(scope="session")
def segment_pool_golden(tmp_path_factory) -> Path:
    """``reprocheck record -- python tests/scripts/segment_pool.py --lr 0.05``, once per
    session: tests/test_script_depth.py and tests/test_html.py check against copies of it."""
    folder = tmp_path_factory.mktemp("segment-pool-golden")
    path = folder / "golden.sqlite"
    result = run_cli(
        "record", "-q", "-o", str(path), "--out", str(folder / "out"),
        "--", "python", str(SCRIPTS / "segment_pool.py"), "--lr", "0.05",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    return path


_AUDITS: dict[tuple, CliResult] = {}  # each distinct audit of a shipped config, once


@pytest.fixture(scope="session")
def _audit_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audits")


@pytest.fixture
def audit(tmp_path: Path, _audit_folder: Path):
    """Run ``reprocheck run CONFIG ...`` into a temporary --out and return the result.

    An audit of a config of ``configs/`` with the same options and environment runs once
    per test session and is shared by every test that asks for it (they only read it);
    a test's own config (in its ``tmp_path``) is audited each time."""

    def _audit(config: str | Path, *extra: str, **kwargs: Any) -> CliResult:
        config = Path(config)
        if not config.is_absolute():
            config = CONFIGS / config
        shared = config.parent == CONFIGS and set(kwargs) <= {"env"}
        key = (str(config), extra, tuple(sorted((kwargs.get("env") or {}).items())))
        if shared and key in _AUDITS:
            return _AUDITS[key]
        folder = _audit_folder / f"a{len(_AUDITS)}" if shared else tmp_path
        folder.mkdir(exist_ok=True)
        report = folder / f"report-{len(list(folder.glob('report-*')))}.json"
        result = run_cli(
            "run",
            str(config),
            "--out",
            str(folder / "out"),
            "--json",
            str(report),
            "-q",
            # attribution reruns the config once per control: the tests that want it ask
            *(() if "--attribute" in extra else ("--no-attribute",)),
            *extra,
            **kwargs,
        )
        if shared:
            _AUDITS[key] = result
        return result

    return _audit


def write_config(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path
