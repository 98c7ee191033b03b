"""``reprocheck doctor CONFIG`` and ``reprocheck explain CODE``: causes and fixes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.text import Text

from .. import jsonout


def register(app: typer.Typer) -> None:
    from ..cli import (
        HTML,
        JSON,
        OUT,
        QUIET,
        UsageError,
        _terminate_as_interrupt,
        _write_html,
        fail,
        preflight,
        stderr,
        stdout,
        user_errors,
    )
    from ..report.safe import clean, cut_all, safe

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @user_errors
    def doctor(
        ctx: typer.Context,
        config_path: Optional[Path] = typer.Argument(
            None, metavar="CONFIG", help="The audit's YAML config (or `-- python train.py ARGS`)."
        ),
        attribute: bool = typer.Option(
            False,
            "--attribute",
            help="Also audit the config and, if it diverges, rerun with each "
            "control on to find the one that fixes it.",
        ),
        steps: int = typer.Option(2, "--steps", min=1, help="Steps each probe runs."),
        out: str = OUT,
        json_path: Optional[Path] = JSON,
        html_path: Optional[Path] = HTML,
        quiet: bool = QUIET,
    ) -> None:
        """Find what can make CONFIG — or a script, `reprocheck doctor -- python train.py
        ARGS` — irreproducible: static checks, then probes that run a few steps: the ops that
        are nondeterministic on CUDA (found on any machine) with their lines, torch.compile,
        and sensitivity to thread count, PYTHONHASHSEED, uninitialized memory and DataLoader
        workers. A script is run unchanged, its first `--steps` steps.

        Exit 0 when nothing is found, 1 when there are findings (`reprocheck explain CODE`),
        3 when a probe's run fails (its error and log are named).
        """
        preflight({"--json": json_path, "--html": html_path}, {"--out": out})
        import dataclasses

        from ..contract import Recipe
        from ..script import resolve_target

        # the target first: a mistake in the command line is said before torch is imported
        config, target = resolve_target(config_path, list(ctx.args), "doctor")
        from ..doctor.probe import ProbeError, dynamic_findings, static_findings
        from ..options import LegOptions, audit_setup
        from ..parent.audit import Auditor, make_audit_dir, run_audit
        from ..verdict import EXIT_FAILED

        # a script's probes run its first `steps` steps, then stop it
        probed = dataclasses.replace(config, steps=steps) if target is not None else config
        _terminate_as_interrupt()
        folder = make_audit_dir(out, f"{config.name}-doctor")
        findings: list[dict[str, Any]] = static_findings(config)
        if not quiet:
            stderr.print(
                Text(
                    f"doctor  {safe(config.name)}: probing {steps} steps in child processes …",
                    style="dim",
                )
            )
        try:
            findings += dynamic_findings(Auditor(target or Recipe()), probed, folder, steps)
        except ProbeError as exc:  # a probe that ran nothing found nothing: say so, exit 3
            raise fail(str(exc), EXIT_FAILED) from None
        audit: dict[str, Any] | None = None
        if attribute:
            audited, options = audit_setup(
                config, LegOptions(out=str(folder / "audit")), target=target, attribute=True
            )
            audit = run_audit(audited, options)
            for item in audit["findings"]:
                if item not in findings:
                    findings.append(item)
        result = {
            "schema": "reprocheck.doctor/1",
            "config": {"name": config.name, "path": config.path},
            "command": ["python", *target.argv] if target else None,
            "findings": findings,
            "exit_code": 1 if findings else 0,
            "out_dir": str(folder),
            "audit": None
            if audit is None
            else {
                "verdict": audit["verdict"],
                "first_divergence": audit["first_divergence"],
                "attribution": audit["attribution"],
            },
        }
        result["html"] = _write_html(result, html_path or folder / "report.html")
        if json_path is not None:
            text = jsonout.dumps(cut_all(result), indent=2, default=str) + "\n"
            if str(json_path) == "-":
                sys.stdout.write(text)
            else:
                Path(json_path).write_text(text, encoding="utf-8")
        if not quiet and not (json_path is not None and str(json_path) == "-"):
            _render(result)
        raise typer.Exit(1 if findings else 0)

    @app.command()
    @user_errors
    def explain(
        code: str = typer.Argument(..., metavar="CODE", help="A rule code, e.g. RC004."),
    ) -> None:
        """Print one doctor rule in full: what it detects, why it matters, an example, the fix."""
        from ..doctor.rules import find

        try:
            rule = find(code)
        except KeyError as exc:
            raise UsageError(exc.args[0]) from None
        stdout.print(rule.explain(), markup=False, highlight=False)

    def _render(result: dict[str, Any]) -> None:
        result = clean(result)  # names and messages from the probes' runs: made safe
        audit = result["audit"]
        if audit is not None:
            d = audit["first_divergence"]
            where = f" at step {d['step']} · {d['phase']} · {d['tensor']}" if d else ""
            stdout.print(Text(f"audit   {audit['verdict']}{where}"))
        if not result["findings"]:
            stdout.print(Text("✔ no findings", style="bold green"))
        for item in result["findings"]:
            line = Text(f"{item['code']} ", style="bold red")
            line.append(f"{item['name']}: ", style="bold")
            line.append(item["message"])
            stdout.print(line)
            stdout.print(Text(f"        fix: {item['fix']}", style="dim"))
        if result["findings"]:
            stdout.print(Text("        reprocheck explain CODE for the whole rule", style="dim"))
        if result.get("html"):
            stdout.print(Text(f"report  {result['html']}", style="dim"))
