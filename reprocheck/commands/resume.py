"""``reprocheck resume --at K --with "ARGS" -- python train.py ARGS``: does training resumed
from its own checkpoint match the run that never stopped? (``run CONFIG --resume-at K``:
the same for a config, with reprocheck's own checkpoints.)"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

CONTROL_HELP = (
    "The control run: the resumed run again with one part of the state disturbed after "
    "the load — rng (generators re-seeded from entropy), optimizer (its state zeroed), "
    "data (one batch skipped) — which must diverge. auto: rng where the script draws "
    "from the generators after the checkpoint, else optimizer where it keeps state, else "
    "data; none: no control."
)


def emit_resume(
    report: dict[str, Any],
    json_path: Optional[Path],
    quiet: bool,
    html_path: Optional[Path],
    junit: Optional[Path] = None,
    output_format: str = "text",
) -> dict[str, Any]:
    """Write a resume report: report.json and report.html in its folder, and where asked
    the JSON, the page, JUnit, annotations; the terminal report unless quiet."""
    from .. import jsonout
    from ..cli import stdout
    from ..report import resume as render
    from ..report.json import write_report
    from ..report.safe import cut_all, safe

    report = cut_all(report)
    folder = Path(report["out_dir"])
    page = html_path or folder / "report.html"
    try:
        report["html"] = str(render.write_html(report, page))
    except OSError as exc:
        report["html"] = None
        print(f"reprocheck: warning: {safe(f'{page} not written: {exc}')}", file=sys.stderr)
    try:
        write_report(report, folder / "report.json")
    except OSError as exc:
        print(f"reprocheck: warning: {safe(f'report.json not written: {exc}')}", file=sys.stderr)
    if json_path is not None and str(json_path) != "-":
        write_report(report, json_path)
    if junit is not None:
        render.write_junit(report, junit)
    machine = output_format != "text" or (json_path is not None and str(json_path) == "-")
    if (json_path is not None and str(json_path) == "-") or output_format == "json":
        sys.stdout.write(jsonout.dumps(report, indent=2, default=str) + "\n")
    elif output_format == "github":
        sys.stdout.write("\n".join(render.annotations(report)) + "\n")
    if not quiet and not machine:
        render.render(report, stdout)
    elif report["exit_code"] == 3 and report.get("reason"):  # a CI log still says why
        print(f"reprocheck: {safe(report['reason'])}", file=sys.stderr)
    return report


def check_control(control: str) -> str:
    from ..cli import UsageError
    from ..parent.resume import CONTROLS

    if control not in CONTROLS:
        raise UsageError(f"--control takes {', '.join(CONTROLS)} (got {control!r})")
    return control


def register(app: typer.Typer) -> None:
    from ..cli import (
        HTML,
        JSON,
        OUT,
        QUIET,
        STEPS,
        TIMEOUT,
        RunProgress,
        UsageError,
        _terminate_as_interrupt,
        preflight,
        prewarm_html,
        user_errors,
    )

    @app.command(
        "resume",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @user_errors
    def resume(
        ctx: typer.Context,
        at: int = typer.Option(
            ...,
            "--at",
            min=1,
            help="Stop the second run right after its first checkpoint saved at step K or later.",
        ),
        with_: str = typer.Option(
            "",
            "--with",
            help='The arguments that make the command resume, appended to it: "--resume", '
            '"--init_from=resume", "--resume_from_checkpoint out/checkpoint-4".',
        ),
        steps: Optional[int] = STEPS,
        control: str = typer.Option("auto", "--control", help=CONTROL_HELP),
        preset: str = typer.Option("seeded", "--preset", help="seeded | strict | none."),
        seed: int = typer.Option(0, "--seed", min=0, help="Seed applied before the script starts."),
        out: str = OUT,
        timeout: Optional[float] = TIMEOUT,
        quiet: bool = QUIET,
        junit: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML file."),
        output_format: str = typer.Option(
            "text", "--format", help="text | github (::error annotations) | json (stdout)."
        ),
        json_path: Optional[Path] = JSON,
        html_path: Optional[Path] = HTML,
    ) -> None:
        """Does the script resumed from its own checkpoint train as the run that never
        stopped? `reprocheck resume --at 4 --with "--resume" -- python train.py`.

        Three runs, each in a folder of its own under the audit's: the reference, to the
        script's end (or `--steps N`); the same command stopped right after its first
        checkpoint saved at step K or later (`torch.save`, safetensors, the frameworks'
        writers); the command with the `--with` arguments, in the stopped run's folder, to
        step N. The resumed run is aligned to the reference by content (its weights at its
        first step equal the reference's after step c) and its steps compared with c+1…N
        bit for bit. A divergence names what the checkpoint failed to restore — data
        position, generators, optimizer, scheduler, loss scaler, weights (rules
        RC032–RC038) — with the keys the checkpoint held. A control run (`--control`)
        disturbs one part of the state after the load and must diverge; where it does not,
        the report says the match proves less.

        Paths in the command that name your files are passed absolute; what the script
        writes by a relative path lands in its run's folder; `{run_dir}` is that folder.

        Exit: 0 equivalent, 1 diverged (or two runs already differ before the checkpoint:
        not reproducible), 3 not verified (no checkpoint saved at or after K, a run failed,
        the resumed run trained no step), 2 usage. See docs/resume.md.
        """
        preflight(
            {"--junit": junit, "--json": json_path, "--html": html_path},
            {"--out": out},
            {"--steps": steps},
        )
        if output_format not in ("text", "github", "json"):
            raise UsageError(f"--format takes text, github or json (got {output_format!r})")
        check_control(control)
        try:
            resume_args = tuple(shlex.split(with_))
        except ValueError as exc:
            raise UsageError(f"--with: {exc}") from None
        from ..script import ScriptError, script_config

        config, target = script_config(
            list(ctx.args), "resume", repeats=1, steps=steps, preset=preset, seed=seed
        )
        if target.kind == "torchrun":
            raise ScriptError(
                "resume audits one training process: a torchrun job is not supported yet"
            )
        import dataclasses
        import os

        from ..parent.resume import ResumeAudit, ResumeOptions, absolute_words

        here = os.getcwd()
        target = dataclasses.replace(target, argv=absolute_words(target.argv, here))
        options = ResumeOptions(
            at=at, resume_args=resume_args, control=control, out=out, timeout=timeout
        )
        _terminate_as_interrupt()
        machine = output_format != "text" or (json_path is not None and str(json_path) == "-")
        with RunProgress(quiet or machine) as progress:
            prewarm_html()
            report = ResumeAudit(config, target, options, progress.update).report()
        report = emit_resume(report, json_path, quiet, html_path, junit, output_format)
        raise typer.Exit(report["exit_code"])
