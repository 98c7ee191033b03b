"""``reprocheck show TRACE [--step K]``: look inside one run's trace.

A trace is a file anyone may have written: every string read from it (names, error,
environment) is shown made safe (report/safe.py), escape sequences escaped and a long
string cut."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text


def register(app: typer.Typer) -> None:
    from ..cli import UsageError, stdout, user_errors
    from ..report.safe import safe

    @app.command()
    @user_errors
    def show(
        trace_path: Path = typer.Argument(..., metavar="TRACE", help="A run's trace (.sqlite)."),
        step: Optional[int] = typer.Option(
            None, "--step", "-s", help="List every record of this step (digest, shape, sketch)."
        ),
    ) -> None:
        """Show a trace: its run and environment, then its steps, or one step's records.

        Example: reprocheck show reports/demo-…/cpu-t1-r0.sqlite --step 3
        """
        from ..trace import Trace

        # read as a foreign trace: read-only, never written, nothing made beside it
        with Trace(trace_path, own=False) as trace:
            meta = trace.run_meta
            env = trace.run_meta.environment or {}
            config = trace.run_meta.config or {}
            steps = f"steps 0–{trace.last_step}" if trace.steps else "no step committed"
            if step is not None and step not in trace.steps:
                raise UsageError(f"{trace_path} has no step {step} ({steps})")
            head = Text(safe(trace_path), style="bold")
            stdout.print(head)
            steps = f"steps 0–{trace.last_step}" if trace.steps else "no step committed"
            status = Text(
                f"  {safe(config.get('name'))} · leg {safe(meta.leg)} · run #{safe(meta.run)} · "
            )
            status.append(
                safe(trace.status), style="green" if trace.status == "complete" else "red"
            )
            status.append(f" · {steps} · {trace.record_count():,} records · {safe(meta.hasher)}")
            stdout.print(status)
            stdout.print(
                Text(
                    safe(
                        f"  torch {env.get('torch')} · python {env.get('python')} · "
                        f"{env.get('cpu')} ({env.get('cpu_capability')}) · "
                        f"threads {env.get('threads')}"
                    ),
                    style="dim",
                )
            )
            if trace.error:
                stdout.print(Text(f"  error: {safe(trace.error)}", style="red"))
            if step is None:
                _steps_table(trace)
                return
            table = Table(box=None, pad_edge=False)
            for column in ("#", "phase", "tensor", "shape", "dtype", "digest", "sum", "absmax"):
                table.add_column(
                    column, justify="right" if column in ("#", "sum", "absmax") else "left"
                )
            for record in trace.records(step):
                sketch = record.sketch
                table.add_row(
                    str(record.seq),
                    Text(safe(record.phase)),
                    Text(safe(record.name)),
                    Text(safe(record.shape_text)),
                    Text(safe(record.dtype)),
                    record.digest.hex()[:16],
                    f"{sketch[0]:.6g}" if sketch else "–",
                    f"{sketch[2]:.6g}" if sketch else "–",
                )
            stdout.print(table)

    def _steps_table(trace) -> None:
        table = Table(box=None, pad_edge=False)
        for column in ("step", "records", "loss", "ms"):
            table.add_column(column, justify="right")
        for number, records, loss, wall in trace.step_rows():
            table.add_row(
                str(number),
                str(records),
                "–" if loss is None else f"{loss:.6g}",
                f"{wall * 1000:.2f}",
            )
        stdout.print(table)
