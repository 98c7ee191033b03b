"""``reprocheck record`` and ``reprocheck check``: golden traces for pre-merge checks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from .. import jsonout

TARGET = typer.Argument(
    None, metavar="CONFIG", help="The audit's YAML config (or `-- python train.py ARGS`)."
)
# `-- python train.py ARGS`: click hands `python` to CONFIG and the rest over as extra args
SCRIPT_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def register(app: typer.Typer) -> None:
    from ..cli import (
        COMPILE,
        DEPTH,
        DEVICE,
        ENV,
        EVERY,
        HTML,
        JOBS,
        JSON,
        OUT,
        PYTHON,
        QUIET,
        RECORD,
        REPEATS,
        STEPS,
        THREADS,
        TIMEOUT,
        RunProgress,
        UsageError,
        _emit,
        _terminate_as_interrupt,
        fail,
        preflight,
        prewarm_html,
        stdout,
        user_errors,
    )

    def _audit(ctx: typer.Context, config, target, quiet: bool, **golden):
        from ..options import LegOptions, audit_setup
        from ..parent.audit import run_audit

        # no attribution here: a golden check answers "did the numerics change?"; run
        # `reprocheck run --attribute` or `doctor` to ask why a config does not reproduce
        config, options = audit_setup(
            config,
            LegOptions.from_cli(ctx.params),
            target=target,
            sketch=True,
            attribute=False,
            **golden,
        )
        _terminate_as_interrupt()
        with RunProgress(quiet) as progress:
            prewarm_html()
            return config, run_audit(config, options, progress=progress.update)

    @app.command(context_settings=SCRIPT_ARGS)
    @user_errors
    def record(
        ctx: typer.Context,
        config_path: Optional[Path] = TARGET,
        output: Path = typer.Option(..., "-o", "--output", help="Where to write the golden trace."),
        # the leg options (cli.LEG_OPTIONS), read back by LegOptions.from_cli
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
    ) -> None:
        """Audit CONFIG — or a script: `reprocheck record -o golden.sqlite -- python train.py
        ARGS` — and, if it reproduces, keep run 0 as a golden trace to check against.

        The golden holds digests, numeric sketches and the environment (no tensors): commit
        it, then run `reprocheck check CONFIG --against golden.sqlite` (or `reprocheck check
        --against golden.sqlite -- python train.py ARGS`) on every change.
        """
        preflight({"--output": output}, {"--out": out}, {"-n": repeats, "--steps": steps})
        from ..script import resolve_target

        # the target first: a mistake in the command line is said before torch is imported
        config, target = resolve_target(config_path, list(ctx.args), "record")
        from ..golden import reference_trace, write_golden

        config, report = _audit(ctx, config, target, quiet)
        report = _emit(report, None, quiet)
        if report["verdict"] != "reproducible":
            why = (
                "the audit was not verified (the runs agreed, but see its reason)"
                if report["verdict"] == "not_verified"
                else "the audit did not reproduce"
            )
            stdout.print(Text(f"no golden trace written: {why}", style="red"))
            raise typer.Exit(report["exit_code"])
        reference = reference_trace(report)
        if reference is None:
            raise UsageError("no run completed: nothing to keep as a golden trace")
        facts = write_golden(reference, output, config)
        stdout.print(
            Text.assemble(
                ("golden      ", "dim"),
                (str(output), "bold"),
                f"  {facts['bytes']:,} bytes · {facts['steps']} steps · "
                f"{facts['bytes_per_step']:,} B/step · {facts['bytes_per_record']} B/record",
            )
        )

    @app.command(context_settings=SCRIPT_ARGS)
    @user_errors
    def check(
        ctx: typer.Context,
        config_path: Optional[Path] = TARGET,
        against: Path = typer.Option(..., "--against", help="The golden trace (from `record`)."),
        # the leg options (cli.LEG_OPTIONS), read back by LegOptions.from_cli
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
        junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML file."),
        output_format: str = typer.Option(
            "text", "--format", help="text | github (::error annotations) | json (stdout)."
        ),
        any_config: bool = typer.Option(
            False,
            "--any-config",
            help="Allow a golden trace of a differently named config.",
        ),
        json_path: Optional[Path] = JSON,
        html_path: Optional[Path] = HTML,
    ) -> None:
        """Rerun CONFIG — or a script: `reprocheck check --against golden.sqlite -- python
        train.py ARGS` — and compare it with a golden trace: exit 0 unchanged, 1 changed.

        Same environment (torch, CPU capability, threads, device): compared bit for bit.
        Another environment: the differences are listed and the runs compared under the
        config's tolerance, naming the first step and tensor that leave it. A script's
        golden belongs to its path; changed arguments or script content are listed in the
        report, and the runs compared all the same.
        """
        preflight(
            {"--junit": junit, "--json": json_path, "--html": html_path},
            {"--out": out},
            {"-n": repeats, "--steps": steps},
        )
        from ..script import resolve_target

        if output_format not in ("text", "github", "json"):
            raise UsageError(f"--format takes text, github or json (got {output_format!r})")
        # a bad config or script is said before the golden is read (and, for a mistake in
        # the command line, before torch is imported)
        config, target = resolve_target(config_path, list(ctx.args), "check")
        from ..contract import Recording
        from ..golden import GoldenError, golden_recording, precheck

        # a golden that is not this config's (or script's), or holds no training step (exit
        # 3), is said before any run
        try:
            precheck(str(against), config, list(target.argv) if target else None, any_config)
            recorded = golden_recording(str(against))
        except GoldenError as exc:
            raise fail(str(exc), exc.exit_code) from None
        # the check records as its golden did (a sparse golden: sparse runs)
        if (record, every) == ("full", None):
            ctx.params.update(record=recorded.mode, every=recorded.every)
        elif Recording(record, every) != recorded:
            raise UsageError(
                f"--record/--every: the golden was recorded {recorded.describe()} "
                "(leave them out to check the way it was recorded)"
            )
        machine = output_format != "text"
        try:
            config, report = _audit(
                ctx, config, target, quiet or machine, golden=str(against), any_config=any_config
            )
        except GoldenError as exc:
            raise fail(str(exc), exc.exit_code) from None
        report = _emit(report, json_path, quiet or machine, html_path)
        if junit is not None:
            from ..report.junit import write_junit

            write_junit(report, junit)
        if output_format == "github":
            from ..report.github import annotations

            sys.stdout.write("\n".join(annotations(report)) + "\n")
        elif output_format == "json":
            sys.stdout.write(jsonout.dumps(report, indent=2, default=str) + "\n")
        raise typer.Exit(report["exit_code"])
