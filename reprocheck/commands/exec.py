"""``reprocheck exec -- python train.py ARGS``: audit a training script, unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from ..cli import (
        COMPILE_OPTION_HELP,
        COMPILE_SCRIPT_HELP,
        CONFIDENCE_HELP,
        ENV_OPTION_HELP,
        HTML_OPTION_HELP,
        MAX_RATE_HELP,
        PYTHON_OPTION_HELP,
        RunProgress,
        _emit,
        _split_list,
        _terminate_as_interrupt,
        _threads,
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
        repeats: Optional[int] = typer.Option(
            None,
            "-n",
            "--repeats",
            min=1,
            max=1000,
            help="Runs per leg (2; with --max-rate: at most).",
        ),
        max_rate: Optional[str] = typer.Option(None, "--max-rate", help=MAX_RATE_HELP),
        confidence: Optional[str] = typer.Option(None, "--confidence", help=CONFIDENCE_HELP),
        steps: Optional[int] = typer.Option(
            None, "--steps", min=1, help="Stop each run cleanly after K optimizer steps."
        ),
        device: Optional[List[str]] = typer.Option(
            None, "--device", help="Leg label(s): cpu, cuda."
        ),
        threads: Optional[List[str]] = typer.Option(
            None, "--threads", help="Thread counts, e.g. 1,2."
        ),
        preset: str = typer.Option("seeded", "--preset", help="seeded | strict | none."),
        seed: int = typer.Option(0, "--seed", min=0, help="Seed applied before the script starts."),
        out: str = typer.Option(
            "reports", "--out", help="Folder for traces, logs and report.json."
        ),
        json_path: Optional[Path] = typer.Option(
            None, "--json", help="Also write the JSON report."
        ),
        html_path: Optional[Path] = typer.Option(None, "--html", help=HTML_OPTION_HELP),
        env: Optional[List[str]] = typer.Option(None, "--env", help=ENV_OPTION_HELP),
        compile_: Optional[List[str]] = typer.Option(
            None, "--compile", help=COMPILE_OPTION_HELP + " " + COMPILE_SCRIPT_HELP
        ),
        python: Optional[List[str]] = typer.Option(None, "--python", help=PYTHON_OPTION_HELP),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Runs in parallel."),
        timeout: Optional[float] = typer.Option(
            None, "--timeout", min=0.1, help="Seconds per run."
        ),
        fail_fast: bool = typer.Option(
            True, "--fail-fast/--no-fail-fast", help="Stop on divergence."
        ),
        measure: bool = typer.Option(
            True,
            "--measure/--no-measure",
            help="Replay the divergent step (the script reruns from its start) to diff the "
            "real tensors.",
        ),
        zoom: bool = typer.Option(
            True,
            "--zoom/--no-zoom",
            help="In that replay, capture every aten op of the step: the first divergent op, "
            "its module, source line and cause.",
        ),
        attribute: bool = typer.Option(
            True,
            "--attribute/--no-attribute",
            help="After a divergence, rerun the script with each control on (seeds, hash "
            "seed, deterministic algorithms, one thread) to find the one that fixes it; a "
            "control the script overrides itself is said to be overridden.",
        ),
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
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no report."),
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
        from ..script import ScriptError, script_config

        if as_is:
            if preset not in ("seeded", "none"):
                raise ScriptError(f"--as-is runs with no preset: drop --preset {preset}")
            preset = "none"
        repeats, level, rate = rate_repeats(repeats, max_rate, confidence, 2)
        # the command line first: a mistake in it is said before torch is imported
        config, target = script_config(
            list(ctx.args), "exec", repeats=repeats, steps=steps, preset=preset, seed=seed
        )
        from ..configfile import apply_overrides as _overrides
        from ..parent.audit import AuditOptions, run_audit

        config = _overrides(
            config,
            devices=_split_list(device),
            threads=_threads(threads),
            env=env,
            compile=compile_,
            python=python,
        )
        options = AuditOptions(
            out=out,
            jobs=jobs,
            timeout=timeout,
            fail_fast=fail_fast,
            measure=measure,
            zoom=zoom,
            attribute=attribute,
            target=target,
            confidence=level,
            max_rate=rate,
        )
        if not as_is_check or as_is:
            options.as_is = False
        _terminate_as_interrupt()
        with RunProgress(quiet) as progress:
            prewarm_html()
            report = run_audit(config, options, progress=progress.update)
        _emit(report, json_path, quiet, html_path)
        raise typer.Exit(report["exit_code"])
