"""The command line: parse, call, render, exit. No audit logic lives here.

Exit codes: 0 reproducible · 1 diverged · 2 usage or config error · 3 a run failed
(crash, timeout, killed) · 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

from . import __version__, jsonout
from .contract import RECORD_MODES, Recording
from .options import DEFAULT_OUT, DEFAULT_REPEATS, DEPTHS, REPEATS_RANGE, LegOptions, audit_setup
from .report.safe import clean, cut_all, safe
from .verdict import EXIT_DIVERGED, EXIT_FAILED, EXIT_REPRODUCIBLE, EXIT_USAGE

try:  # typer >= 0.20 carries its own click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - an older typer: click itself
    from click.exceptions import UsageError as ClickUsageError

stdout = Console(highlight=False, soft_wrap=True)
if not stdout.is_terminal and "COLUMNS" not in os.environ:
    stdout.width = 120  # logs and pipes: room for the across-legs table
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


class UsageError(Exception):
    """A mistake in what the user asked for: one line, exit 2."""


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print one line on stderr and return the Exit to raise (the message made safe: one
    line, no escape sequence from a name in it, cut when long)."""
    stderr.print(f"reprocheck: error: {safe(message)}", markup=False, highlight=False)
    return typer.Exit(code)


class OneLineGroup(TyperGroup):
    """The commands' group: a mistake click finds on the command line (a number out of its
    range, a value that is no number, an unknown or missing option) is one line and exit 2,
    like every other usage error, instead of click's usage box."""

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        raw = list(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except ClickUsageError as exc:
            raise _one_line(exc, raw) from None
        ctx.meta["reprocheck.argv"] = raw
        return ctx

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ClickUsageError as exc:
            raise _one_line(exc, ctx.meta.get("reprocheck.argv") or []) from None


def _one_line(exc: Exception, argv: list[str]) -> Exception:
    """click's usage error as one line (``reprocheck`` alone still prints its help)."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return exc
    message = _range_message(exc, argv)
    if message is None:
        message = exc.format_message().rstrip(".")  # type: ignore[attr-defined]
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message += f" (see {ctx.command_path} -h)"
    return fail(message)


def out_of_range(option: str, value: Any, low: Any = None, high: Any = None) -> str:
    """``-n: 0 is out of range 1..1000``, ``--jobs: 0 is out of range (at least 1)``: a number
    outside its option's range, said as the config's own ranges are."""
    if low is not None and high is not None:
        return f"{option}: {value} is out of range {low:g}..{high:g}"
    bound = f"at least {low:g}" if low is not None else f"at most {high:g}"
    return f"{option}: {value} is out of range ({bound})"


def _range_message(exc: Exception, argv: list[str]) -> str | None:
    """A number click refused for its option's range, as :func:`out_of_range` says it;
    None for any other mistake."""
    param = getattr(exc, "param", None)
    if param is None:
        return None
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is None and high is None:  # an older typer: click's IntRange/FloatRange
        bounds = getattr(param, "type", None)
        low, high = getattr(bounds, "min", None), getattr(bounds, "max", None)
    given = _given(argv, param)
    if (low is None and high is None) or given is None:
        return None
    option, raw = given
    try:
        value = float(raw)
    except ValueError:  # no number at all: click's own words
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        return out_of_range(option, raw, low, high)
    return None


def _given(argv: list[str], param: Any) -> tuple[str, str] | None:
    """(the option as typed, its value) where ``param`` was last given on the command line
    (``--steps 0``, ``--steps=0``, ``-j0``); ``--`` ends the options."""
    names = [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
    found = None
    index = 0
    while index < len(argv) and argv[index] != "--":
        token = argv[index]
        index += 1
        for name in names:
            if token == name and index < len(argv):
                found = (name, argv[index])
                index += 1
                break
            if name.startswith("--") and token.startswith(name + "="):
                found = (name, token[len(name) + 1 :])
                break
            if len(name) == 2 and len(token) > 2 and token.startswith(name):  # -j0
                found = (name, token[2:])
                break
    return found


app = typer.Typer(
    name="reprocheck",
    help=(
        "Audit PyTorch training for bitwise reproducibility: run a config N times under "
        "identical seeding and report the first divergent step, phase and tensor.\n\n"
        "Exit codes: 0 reproducible · 1 diverged · 2 usage or config error · "
        "3 a run failed (crash, timeout, killed) · 130 interrupted."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OneLineGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def user_errors(command: F) -> F:
    """Turn the errors a user can cause into one line and exit 2 (``--debug``: traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, _user_error_types()):
                if _state["debug"]:
                    traceback.print_exc()
                raise fail(str(exc)) from None
            if isinstance(exc, OSError):
                if _state["debug"]:
                    traceback.print_exc()
                where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
                raise fail(f"{exc.strerror or exc}:{where}".rstrip(":")) from None
            raise

    return wrapper  # type: ignore[return-value]


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that are the user's, as one line. Looked up once one was raised: the
    runner (and torch) is not imported for a usage error, and an OutputError exists only
    once the runner was loaded."""
    from .config import ConfigError
    from .script import ScriptError
    from .trace import TraceError

    audit = sys.modules.get("reprocheck.parent.audit")
    output = (audit.OutputError,) if audit is not None else ()
    return (ConfigError, TraceError, ScriptError, UsageError, ValueError, *output)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"reprocheck {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug


def _fraction(value: Optional[str], option: str) -> float | None:
    """``5%`` or ``0.05`` → 0.05; strictly between 0 and 1, else one line naming the option."""
    if value is None:
        return None
    text = value.strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"{option} takes a rate such as 5% or 0.05 (got {value!r})") from None
    if not 0 < number < 1:
        raise UsageError(f"{option}: {value} is out of range (between 0 and 100%)")
    return number


def rate_repeats(
    repeats: int | None, max_rate: Optional[str], confidence: Optional[str], default: int
) -> tuple[int | None, float, float | None]:
    """(runs per leg, confidence, the rate asked for): ``--max-rate R`` asks for the runs
    whose agreement bounds the divergence rate below R (``-n`` caps them); without it,
    ``-n`` or ``default``."""
    level = _fraction(confidence, "--confidence") or 0.95
    rate = _fraction(max_rate, "--max-rate")
    if rate is None:
        return (repeats if repeats is not None else default), level, None
    from .evidence import runs_for

    needed = runs_for(rate, level)
    return (min(needed, repeats) if repeats is not None else needed), level, rate


def preflight(
    files: Optional[dict[str, Any]] = None,
    folders: Optional[dict[str, Any]] = None,
    counts: Optional[dict[str, Any]] = None,
) -> None:
    """What a command was asked for, checked before anything runs (and before torch is
    imported): every output ``files`` (option → path; ``--html`` may name a folder still to
    create, ``--json -`` is stdout) can be written, every ``folders`` (``--out``) exists or can
    be created, and every ``counts`` is at least 1. A problem is a UsageError naming the
    option: one line, exit 2, no run started and no folder created."""
    for option, value in (counts or {}).items():
        if value is not None and value < 1:
            raise UsageError(out_of_range(option, value, 1))
    for option, path in (files or {}).items():
        if path is None or (option == "--json" and str(path) == "-"):
            continue
        _check_file(option, os.fspath(path), create=option == "--html")
    for option, path in (folders or {}).items():
        if path is not None:
            _check_folder(option, os.fspath(path), os.fspath(path))


def _folder_text(path: str) -> str:
    return os.path.join(path, "")  # `missing/`: said as a folder


def _check_file(option: str, path: str, create: bool) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{option}: a folder, not a file: {_folder_text(path)}")
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{option}: folder not writable: {_folder_text(folder)} (for {path})")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise UsageError(f"{option}: file not writable: {path}")
    elif os.path.exists(folder):
        raise UsageError(f"{option}: not a folder: {folder} (for {path})")
    elif create:  # the page's folder is made when it is written
        _check_folder(option, folder, path)
    else:
        raise UsageError(f"{option}: no such folder: {_folder_text(folder)} (for {path})")


def _check_folder(option: str, folder: str, path: str) -> None:
    """``folder`` is a writable folder, or the nearest folder above it that exists is (the
    audit makes the rest); ``path``: what the option named, said in the message."""
    existing = folder
    while not os.path.exists(existing):  # ends at `.` or `/`, which exist
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    where = "" if existing == path else f" (for {path})"
    if not os.path.isdir(existing):
        raise UsageError(f"{option}: not a folder: {existing}{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: folder not writable: {_folder_text(existing)}{where}")


class RunProgress:
    """A bar per run, updated from the launcher's polling; silent when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.progress = (
            None
            if quiet
            else Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
        )
        self.tasks: dict[tuple[str, int], Any] = {}

    def __enter__(self) -> RunProgress:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def update(self, result: Any, done: int, total: int) -> None:
        if self.progress is None:
            return
        key = (result.leg, result.run)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(  # the bar reads markup: escaped
                escape(safe(f"{result.leg} #{result.run}", 200)), total=total or None, status=""
            )
        status = "" if result.status in ("running", "complete") else escape(safe(result.status))
        if not status and result.agreed is not None:  # long runs: how far they agree so far
            status = f"identical to step {result.agreed:,}"
        self.progress.update(self.tasks[key], completed=done, total=total or None, status=status)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _terminate_as_interrupt() -> None:
    """SIGTERM (a CI runner cancelling the job) stops the runs like Ctrl-C does, so no
    child is left running and the partial report is still written."""
    signal.signal(signal.SIGTERM, _interrupt)


def _emit(
    built: dict[str, Any], json_path: Optional[Path], quiet: bool, html_path: Optional[Path] = None
) -> dict[str, Any]:
    """Write and render a built report; returns the report as written (long strings cut
    once, here, and the page's path added), which whatever is written after (`check`'s
    JUnit, annotations, --format json) uses. The built report is left as it was."""
    from .report.json import write_report
    from .report.terminal import render

    cut = cut_all(built)
    report = {**cut, "html": _write_html(cut, html_path or Path(cut["out_dir"]) / "report.html")}
    folder_json = Path(report["out_dir"]) / "report.json"
    try:
        write_report(report, folder_json)
    except OSError as exc:  # a full disk: the report goes where it can, the exit code stands
        print(f"reprocheck: warning: {safe(f'{folder_json} not written: {exc}')}", file=sys.stderr)
    if json_path is not None:
        if str(json_path) == "-":
            sys.stdout.write(jsonout.dumps(report, indent=2, default=str) + "\n")
            return report
        write_report(report, json_path)
    if not quiet:
        render(report, stdout)
    elif report["verdict"] == "failed":  # a CI log still says why, in one line
        print(f"reprocheck: {safe(_failure_line(report))}", file=sys.stderr)
    return report


def _write_html(report: dict[str, Any], path: Path) -> Optional[str]:
    """The report as one self-contained page; a page that cannot be written is said on
    stderr and changes no verdict (the JSON and the exit code are the answer)."""
    from .doctor.rules import BY_CODE
    from .report.html import write_html

    codes = {f.get("code") for f in report.get("findings") or []}
    rules = {
        code: {"why": rule.why, "example": rule.example, "fix": rule.fix}
        for code, rule in BY_CODE.items()
        if code in codes
    }
    try:
        return str(write_html(report, path, rules))
    except Exception as exc:  # a page is a view, never the verdict
        print(f"reprocheck: warning: {safe(f'{path} not written: {exc}')}", file=sys.stderr)
        return None


def prewarm_html() -> None:
    """Import what the HTML page needs (matplotlib, Jinja2: ~0.3 s) in a background thread
    while the runs train in their own processes, so the page costs only its rendering."""
    import threading

    def load() -> None:
        with contextlib.suppress(Exception):
            from .report import html

            html._pyplot()
            import jinja2  # noqa: F401

    threading.Thread(target=load, name="reprocheck-html-prewarm", daemon=True).start()


def _failure_line(report: dict[str, Any]) -> str:
    """Why a failed audit failed: its reason, else the first failed run's error."""
    if report.get("interrupted"):
        return "interrupted: every run stopped, the partial report is in " + report["out_dir"]
    if report.get("reason"):
        return report["reason"]
    for leg in report["legs"]:
        for run in leg["runs"]:
            if run["status"] not in ("complete", "stopped"):
                return f"{leg['name']} run #{run['run']} {run['status']}: {run['error']}"
    return "the audit failed"


# ------------------------------------------------------------------ the shared options
# Each option an audit command takes is declared here, once: one flag, one help text, one
# default (from reprocheck.options and the config's dataclasses). Every audit command
# (run, exec, record, check) takes all of LEG_OPTIONS, under these parameter names, and
# hands them over with LegOptions.from_cli(ctx.params) to reprocheck.options.audit_setup;
# tests/test_options.py holds them to it.

REPEATS_HELP = (
    f"Runs per leg (config: repeats; a script: {DEFAULT_REPEATS}; with --max-rate: at most)."
)
REPEATS = typer.Option(None, "-n", "--repeats", help=REPEATS_HELP)
# exec's -n: its range is checked here, where exec hands -n to the script's config as it
# is; run, record and check have the config's overrides check it (apply_overrides)
SCRIPT_REPEATS = typer.Option(
    None, "-n", "--repeats", min=REPEATS_RANGE[0], max=REPEATS_RANGE[1], help=REPEATS_HELP
)
STEPS = typer.Option(
    None,
    "--steps",
    min=1,
    help="Optimizer steps per run (config: steps); a script stops cleanly after its K-th.",
)
DEVICE = typer.Option(
    None,
    "--device",
    help="Devices, e.g. cpu,cuda: one leg each (config: devices; a script places its own "
    "tensors: the device names its leg).",
)
THREADS = typer.Option(None, "--threads", help="Thread counts, e.g. 1,2: one leg each.")
ENV = typer.Option(
    None,
    "--env",
    help="KEY=VALUE (repeatable): one more leg with these variables set, compared with the "
    "others under the tolerance (e.g. ATEN_CPU_CAPABILITY=default).",
)
COMPILE = typer.Option(
    None,
    "--compile",
    help="off, on or off,on: legs with the model eager, compiled (torch.compile, default "
    "backend), or both, compared under the tolerance. For a script: off makes torch.compile "
    "return its argument unchanged; on leaves the script's own torch.compile, or compiles "
    "each trained model in place when the script compiles none.",
)
PYTHON = typer.Option(
    None,
    "--python",
    help="PATH (repeatable): one more leg run by that interpreter (another venv: another "
    "torch or NumPy), compared with the others under the tolerance.",
)
DEPTH = typer.Option(
    DEPTHS[0],
    "--depth",
    help="What each run records: step (phases) | module | op (inside a config's steps).",
)
RECORD = typer.Option(
    RECORD_MODES[0],
    "--record",
    help="full: one digest per tensor · sparse: one per phase (every tensor folded in): "
    "a long job's records in kilobytes; a divergence's tensor is then named by replaying "
    "the two runs to its step (docs/long-runs.md).",
)
EVERY = typer.Option(
    None,
    "--every",
    min=1,
    help="Hash only every M-th step (and the last): the first differing interval is "
    "found exactly by replays.",
)
OUT = typer.Option(DEFAULT_OUT, "--out", help="Folder for the traces, logs and reports.")
JOBS = typer.Option(
    None, "--jobs", "-j", min=1, help="Runs in parallel (default: cores ÷ threads)."
)
TIMEOUT = typer.Option(
    None, "--timeout", min=0.1, help="Seconds a run may take; then it is killed (exit 3)."
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress and no terminal report.")
# what every audit command takes: the legs and runs, their folder, and quiet
LEG_OPTIONS = (
    "-n",
    "--steps",
    "--device",
    "--threads",
    "--env",
    "--compile",
    "--python",
    "--depth",
    "--record",
    "--every",
    "--out",
    "--jobs",
    "--timeout",
    "--quiet",
)

JSON = typer.Option(None, "--json", help="Also write the JSON report here ('-': stdout).")
HTML = typer.Option(
    None, "--html", help="Write the HTML report here (default: report.html in the audit's folder)."
)
# how run and exec look for a divergence and explain it (a golden check: no attribution)
MAX_RATE = typer.Option(
    None,
    "--max-rate",
    help="Keep starting runs (up to -n, else as many as it takes) until N agreeing runs bound "
    "the divergence rate below R at --confidence, or a run diverges: 5% (59 runs at 95%), "
    "or 0.05.",
)
CONFIDENCE = typer.Option(
    None,
    "--confidence",
    help="Confidence of the evidence's rate bound: 95% (the default), or 0.99.",
)
FAIL_FAST = typer.Option(
    True, "--fail-fast/--no-fail-fast", help="Stop a leg's runs as soon as two disagree."
)
MEASURE = typer.Option(
    True,
    "--measure/--no-measure",
    help="Replay the divergent step (a script reruns from its start) to diff the real tensors.",
)
ZOOM = typer.Option(
    True,
    "--zoom/--no-zoom",
    help="After a divergence, replay that step op by op: module, aten op, source line, cause.",
)
ATTRIBUTE = typer.Option(
    True,
    "--attribute/--no-attribute",
    help="After a divergence, rerun with each control on (seeds, hash seed, deterministic "
    "algorithms, one thread, ...) to find the one that fixes it; a control a script sets "
    "itself is said to be overridden.",
)


@user_errors
def run(
    ctx: typer.Context,
    config_path: Path = typer.Argument(..., metavar="CONFIG", help="The audit's YAML config."),
    # the leg options (LEG_OPTIONS), read back by LegOptions.from_cli
    repeats: Optional[int] = REPEATS,
    steps: Optional[int] = STEPS,
    device: Optional[List[str]] = DEVICE,
    threads: Optional[List[str]] = THREADS,
    env: Optional[List[str]] = ENV,
    compile_: Optional[List[str]] = COMPILE,
    python: Optional[List[str]] = PYTHON,
    depth: str = DEPTH,
    record: str = RECORD,
    every: Optional[int] = EVERY,
    out: str = OUT,
    jobs: Optional[int] = JOBS,
    timeout: Optional[float] = TIMEOUT,
    quiet: bool = QUIET,
    max_rate: Optional[str] = MAX_RATE,
    confidence: Optional[str] = CONFIDENCE,
    fail_fast: bool = FAIL_FAST,
    measure: bool = MEASURE,
    zoom: bool = ZOOM,
    attribute: bool = ATTRIBUTE,
    json_path: Optional[Path] = JSON,
    html_path: Optional[Path] = HTML,
    resume_at: Optional[int] = typer.Option(
        None,
        "--resume-at",
        min=1,
        help="Instead of the audit: prove reprocheck's own checkpoints exact — a run to "
        "the last step saving at step K, a run resumed from that checkpoint, compared bit "
        "for bit from K+1 (docs/resume.md).",
    ),
    resume_control: str = typer.Option(
        "auto",
        "--resume-control",
        help="With --resume-at: the control run (rng, "
        "optimizer, data, none; auto picks one that applies).",
    ),
) -> None:
    """Run CONFIG N times per leg and report the first divergent step, phase and tensor.

    REPRODUCIBLE (exit 0) states its evidence (k of N runs, the bound of the divergence
    rate; `--max-rate 5%` runs until it is below 5%), a canary (a flipped bit the audit
    must find) and an observer run (recording must leave training alone); DIVERGED (exit
    1); NOT VERIFIED (exit 3): the runs agreed but the canary was missed or recording
    changed training.

    Example: reprocheck run configs/demo.yaml -n 3 --threads 1,2
    """
    preflight({"--json": json_path, "--html": html_path}, {"--out": out})
    from .configfile import load_config
    from .parent.audit import run_audit

    config = load_config(config_path)
    if resume_at is not None:
        _resume_config(ctx, config, resume_at, resume_control, json_path, html_path)
    repeats, level, rate = rate_repeats(repeats, max_rate, confidence, config.repeats)
    config, options = audit_setup(
        config,
        LegOptions.from_cli(ctx.params, repeats=repeats),
        fail_fast=fail_fast,
        measure=measure,
        zoom=zoom,
        attribute=attribute,
        confidence=level,
        max_rate=rate,
    )
    if config.distributed is not None:  # each run a torchrun job of the config's loop
        from .script import distributed_target

        options = dataclasses.replace(options, target=distributed_target(config))
    _terminate_as_interrupt()
    with RunProgress(quiet or (json_path is not None and str(json_path) == "-")) as progress:
        prewarm_html()
        report = run_audit(config, options, progress=progress.update)
    report = _emit(report, json_path, quiet, html_path)
    raise typer.Exit(report["exit_code"])


def _resume_config(
    ctx: typer.Context,
    config: Any,
    at: int,
    control: str,
    json_path: Optional[Path],
    html_path: Optional[Path],
) -> None:
    """``run CONFIG --resume-at K``: the resume audit of a config's own checkpoints."""
    from .commands.resume import check_control, emit_resume
    from .contract import Recipe
    from .parent.resume import ResumeAudit, ResumeOptions

    check_control(control)
    if config.distributed is not None:
        raise UsageError("--resume-at: a distributed config is not supported yet")
    legs = LegOptions.from_cli(ctx.params, repeats=1)
    config, _ = audit_setup(config, legs)
    if at >= config.steps:
        raise UsageError(f"--resume-at {at}: the config trains {config.steps} steps")
    p = ctx.params
    options = ResumeOptions(at=at, control=control, out=p["out"], timeout=p["timeout"])
    _terminate_as_interrupt()
    quiet = p["quiet"] or (json_path is not None and str(json_path) == "-")
    with RunProgress(quiet) as progress:
        prewarm_html()
        report = ResumeAudit(config, Recipe(), options, progress.update).report()
    report = emit_resume(report, json_path, p["quiet"], html_path)
    raise typer.Exit(report["exit_code"])


@user_errors
def compare(
    trace_a: Path = typer.Argument(..., metavar="TRACE_A", help="A run's trace (.sqlite)."),
    trace_b: Path = typer.Argument(..., metavar="TRACE_B", help="Another run's trace."),
    tolerance: str = typer.Option(
        "exact", "--tolerance", help="exact (digests) | ulp:N | rtol=..,atol=.. (numeric sketches)."
    ),
    json_path: Optional[Path] = typer.Option(
        None, "--json", help="Write the result as JSON here ('-': stdout)."
    ),
    any_config: bool = typer.Option(
        False, "--any-config", help="Compare traces even when they come from different configs."
    ),
    html_path: Optional[Path] = typer.Option(
        None, "--html", help="Also write the result as an HTML page here."
    ),
) -> None:
    """Compare two traces: the first divergent step and tensor, or distance under a tolerance.

    Exit 0 when they agree (bitwise, or within the tolerance), 1 when they do not, 2 when
    a file is not a readable trace or the traces come from different configs.
    """
    preflight({"--json": json_path, "--html": html_path})
    from .compare import (
        compare_sketches,
        comparison_dict,
        divergence_dict,
        first_divergence,
        parse_tolerance,
    )
    from .trace import Trace

    parsed = parse_tolerance(tolerance)
    with Trace(trace_a) as a, Trace(trace_b) as b:
        ended = {str(t.path): (t.status, t.last_step, t.error) for t in (a, b)}
        hashers = (a.run_meta.hasher, b.run_meta.hasher)
        identities = [_config_identity(t.run_meta.config) for t in (a, b)]
        names = [(t.run_meta.config or {}).get("name") for t in (a, b)]
        recorded = [Recording.of(t.run_meta.recording) for t in (a, b)]
    if recorded[0] != recorded[1]:
        raise UsageError(
            f"the traces were recorded differently ({recorded[0].describe()} vs "
            f"{recorded[1].describe()}): record both the same way (--record, --every)"
        )
    if identities[0] != identities[1] and not any_config:
        raise UsageError(
            f"the traces come from different configs ({names[0]!r} vs {names[1]!r}): "
            "pass --any-config to compare them anyway"
        )
    result: dict[str, Any] = {
        "schema": "reprocheck.compare/1",
        "traces": [str(trace_a), str(trace_b)],
        "tolerance": parsed.describe(),
        "ended": ended,
    }
    if parsed.exact:
        if hashers[0] != hashers[1]:
            raise UsageError(
                f"the traces were fingerprinted with different hashers "
                f"({hashers[0]} vs {hashers[1]}): "
                "compare them with a tolerance, e.g. --tolerance rtol=1e-5,atol=1e-6"
            )
        divergence = first_divergence([str(trace_a), str(trace_b)])
        result["first_divergence"] = divergence_dict(divergence) if divergence else None
        agree = divergence is None
    else:
        comparison = compare_sketches(str(trace_a), str(trace_b), parsed, ("A", "B"))
        result["comparison"] = comparison_dict(comparison)
        agree = comparison.within_tolerance
    result["agree"] = agree
    if json_path is not None:
        from .report.json import write_report

        if str(json_path) == "-":
            sys.stdout.write(jsonout.dumps(cut_all(result), indent=2, default=str) + "\n")
        else:
            write_report(result, json_path)
    if html_path is not None:
        result["html"] = _write_html(result, html_path)
    if json_path is None or str(json_path) != "-":
        _render_compare(result)
        if result.get("html"):
            stdout.print(f"[dim]report  {result['html']}[/dim]", highlight=False)
    # not comparable (no sketches to measure a difference by) is no pass: exit 3
    raise typer.Exit(
        EXIT_REPRODUCIBLE if agree else EXIT_DIVERGED if agree is False else EXIT_FAILED
    )


def _config_identity(config: Any) -> tuple:
    """What makes two traces comparable: the same name, model and data."""
    config = config if isinstance(config, dict) else {}
    return tuple(json.dumps(config.get(key), sort_keys=True) for key in ("name", "model", "data"))


def _render_compare(result: dict[str, Any]) -> None:
    from rich.text import Text

    result = clean(result)  # paths, errors and tensor names from the traces: made safe
    for path, (status, last, error) in result["ended"].items():
        steps = "no step committed" if last is None else f"steps 0–{last}"
        if status == "complete":
            stdout.print(Text(f"{path}: {steps}", style="dim"))
        else:
            why = f" ({status}: {error})" if error else f" ({status})"
            stdout.print(Text(f"{path}: {steps} — ended early{why}", style="yellow"))
    if "first_divergence" in result:
        d = result["first_divergence"]
        if d is None:
            stdout.print(Text("✔ IDENTICAL  every common step bitwise equal", style="bold green"))
            return
        line = Text("✘ DIVERGED", style="bold red")
        line.append(f" at step {d['step']} · {d['phase']} · ")
        line.append(d["tensor"], style="bold red")
        stdout.print(line)
        stdout.print(Text(f"  digests  A {d['digests'][0]}   B {d['digests'][-1]}", style="dim"))
        return
    c = result["comparison"]
    if c["within_tolerance"] is None:
        stdout.print(Text(f"✘ NOT COMPARABLE ({c['tolerance']})", style="bold red"))
        stdout.print(Text(f"  {c['note']}"))
        return
    if c["within_tolerance"]:
        stdout.print(
            Text(
                f"✔ WITHIN TOLERANCE ({c['tolerance']})  {c['identical']:,} of "
                f"{c['compared']:,} records bitwise identical",
                style="bold green",
            )
        )
    else:
        o = c["first_outside"]
        line = Text(f"✘ OUTSIDE TOLERANCE ({c['tolerance']})", style="bold red")
        line.append(f" from step {o['step']} · {o['phase']} · {o['tensor']}")
        stdout.print(line)
    if c["worst"]:
        w = c["worst"]
        stdout.print(
            Text(
                f"  worst rel Δ {w['max_rel_diff']:.3g} at step {w['step']} {w['tensor']}",
                style="dim",
            )
        )
    if c["note"]:
        stdout.print(Text(f"  note: {c['note']}", style="yellow"))


def _add_commands() -> None:
    """Every command, in the order `reprocheck -h` lists them: the audits, then the tools.
    A command of its own module is added by that module's ``register(app)``."""
    from .commands import doctor, golden, resume, show
    from .commands import exec as exec_command

    app.command()(run)
    exec_command.register(app)  # exec
    resume.register(app)  # resume
    golden.register(app)  # record, check
    doctor.register(app)  # doctor, explain
    app.command()(compare)
    show.register(app)  # show
    for command in app.registered_commands:  # help as paragraphs, whatever the width
        if command.help is None and command.callback is not None:
            command.help = paragraphs(inspect.getdoc(command.callback) or "")


def paragraphs(text: str) -> str:
    """A docstring as help text: the lines of each paragraph joined, so the terminal wraps
    them at its own width (rich keeps a docstring's line breaks as they are); a list item
    (``- ``) or an indented line keeps its own line."""
    out = []
    for block in text.strip().split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and not line.startswith(("- ", "  ")) and not lines[-1].startswith("  "):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        out.append("\n".join(lines))
    return "\n\n".join(out)


_add_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        stderr.print("reprocheck: interrupted", markup=False)
        sys.exit(130)
