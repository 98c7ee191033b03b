"""``reprocheck exec -- python train.py ARGS``: audit a training script, unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from ..cli import (
        ATTRIBUTE,
        COMPILE,
        CONFIDENCE,
        DEPTH,
        DEVICE,
        ENV,
        EVERY,
        FAIL_FAST,
        HTML,
        JOBS,
        JSON,
        MAX_RATE,
        MEASURE,
        OUT,
        PYTHON,
        QUIET,
        RECORD,
        SCRIPT_REPEATS,
        STEPS,
        THREADS,
        TIMEOUT,
        ZOOM,
        RunProgress,
        _emit,
        _terminate_as_interrupt,
        preflight,
        prewarm_html,
        rate_repeats,
        user_errors,
    )

    @app.command(
        "exec",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @user_errors
    def exec_(
        ctx: typer.Context,
        # the leg options (cli.LEG_OPTIONS), read back by LegOptions.from_cli
        repeats: Optional[int] = SCRIPT_REPEATS,
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
        preset: str = typer.Option("seeded", "--preset", help="seeded | strict | none."),
        seed: int = typer.Option(0, "--seed", min=0, help="Seed applied before the script starts."),
        as_is: bool = typer.Option(
            False,
            "--as-is",
            help="Audit the script as its user runs it: no preset (its own seeding, your "
            "environment, a random PYTHONHASHSEED where your shell sets none).",
        ),
        as_is_check: bool = typer.Option(
            True,
            "--as-is-check/--no-as-is-check",
            help="After a reproducible verdict under a preset, two more runs as is: where "
            "they differ, a warning (RC030) says what the preset masked. Never changes the "
            "exit code.",
        ),
        max_rate: Optional[str] = MAX_RATE,
        confidence: Optional[str] = CONFIDENCE,
        fail_fast: bool = FAIL_FAST,
        measure: bool = MEASURE,
        zoom: bool = ZOOM,
        attribute: bool = ATTRIBUTE,
        json_path: Optional[Path] = JSON,
        html_path: Optional[Path] = HTML,
    ) -> None:
        """Run a training script N times, unchanged, and report where the runs first differ.

        Everything after `--` is the command: `reprocheck exec -n 2 -- python train.py --lr 0.1`.
        Each run starts in a fresh process with the determinism preset applied before the
        script's first line. Step k is the k-th optimizer.step() — or, where the script
        updates its parameters by hand, the k-th update of the parameters backward() gave
        gradients to. Every Python process the script starts that trains (mp.spawn workers,
        multiprocessing, subprocesses) is recorded and compared too. An audit that sees no
        training step fails (exit 3). After a divergence at step k the two disagreeing runs
        are replayed from the start to step k: the numeric difference on the real tensors,
        and the first divergent aten op with its module, source line and cause. The
        script's output goes to the run's log (its tail is in the report when a run
        fails). See docs/exec.md.

        Under torchrun (`-- torchrun --standalone --nproc_per_node 2 train.py`) each run is
        one job, every rank is compared with the same rank of the other runs, and the
        replicas within a run with each other (docs/distributed.md). `--compile off,on`,
        `--env KEY=VALUE` and `--python PATH` add legs compared under the tolerance.

        Any launcher works: `-- accelerate launch train.py`, `-- bash run.sh`, `-- srun …`,
        a notebook (`-- HW01.ipynb`); `{run}`, `{run_dir}` and `{port}` in the command give
        each run its own folder or port.

        Verdicts: REPRODUCIBLE (exit 0) states what it rests on: k of N runs diverged with
        the bound of the rate (`--max-rate 5%` keeps starting runs until it is below 5%),
        a canary (a flipped bit the audit must find) and an observer run (recording must
        leave training alone); then two runs as is (no preset) say what the preset masked
        (RC030, a warning). DIVERGED (exit 1). NOT VERIFIED (exit 3): the runs agreed but
        the canary was missed or recording changed training.
        """
        preflight({"--json": json_path, "--html": html_path}, {"--out": out})
        from ..options import DEFAULT_REPEATS, LegOptions, audit_setup
        from ..script import ScriptError, script_config

        if as_is:
            if preset not in ("seeded", "none"):
                raise ScriptError(f"--as-is runs with no preset: drop --preset {preset}")
            preset = "none"
        repeats, level, rate = rate_repeats(repeats, max_rate, confidence, DEFAULT_REPEATS)
        # the command line first: a mistake in it is said before torch is imported. The
        # runs per leg are the script's own (--max-rate may ask more than a config's 1000)
        config, target = script_config(
            list(ctx.args), "exec", repeats=repeats, preset=preset, seed=seed
        )
        from ..parent.audit import run_audit

        config, options = audit_setup(
            config,
            LegOptions.from_cli(ctx.params, repeats=None),
            target=target,
            fail_fast=fail_fast,
            measure=measure,
            zoom=zoom,
            attribute=attribute,
            confidence=level,
            max_rate=rate,
        )
        if not as_is_check or as_is:
            options = dataclasses.replace(options, as_is=False)
        _terminate_as_interrupt()
        with RunProgress(quiet) as progress:
            prewarm_html()
            report = run_audit(config, options, progress=progress.update)
        report = _emit(report, json_path, quiet, html_path)
        raise typer.Exit(report["exit_code"])
