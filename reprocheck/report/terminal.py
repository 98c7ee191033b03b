"""The report for a person: the answer first, the evidence under it, one screen.

Everything that comes from the user's world (tensor, module and file names, error
messages) is printed as literal text, never interpreted as rich markup.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__

GREEN, RED, DIM, YELLOW = "green", "bold red", "dim", "yellow"


def _line(label: str, *parts: str | Text, style: str = "") -> Text:
    text = Text(f"  {label:<12}", style=DIM)
    for part in parts:
        text.append(part if isinstance(part, Text) else Text(part, style=style))
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def header(report: dict[str, Any]) -> list[Text]:
    env = report.get("environment") or {}
    cpu = env.get("cpu") or "unknown CPU"
    if env.get("cpu_capability"):
        cpu += f" ({env['cpu_capability']})"
    threads = env.get("threads")
    parts = [f"reprocheck {__version__}"]
    if env.get("torch"):
        parts.append(f"torch {env['torch']}")
    if env.get("python"):
        parts.append(f"python {env['python']}")
    parts.append(cpu)
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    config = report["config"]
    steps = f"{config['steps']} steps" if config["steps"] else "all its steps"
    lines = [
        Text(" · ".join(parts), style=DIM),
        Text.assemble(
            ("config  ", DIM),
            (config["name"], "bold"),
            f" (seed {config['seed']}, {config['repeats']} runs × {steps}, "
            f"preset {config['preset']})",
        ),
    ]
    if config.get("command"):
        lines.append(Text.assemble(("command ", DIM), " ".join(config["command"])))
    named = config.get("models", []) + config.get("optimizers", [])  # exec: what was hooked
    if named:
        numbered = any(item["prefix"] for item in named)
        lines.append(
            Text.assemble(
                ("models  ", DIM),
                " · ".join(
                    f"{item['prefix'].rstrip('.')} {item['type']}".strip() for item in named
                ),
                ("  (prefixes by creation order)" if numbered else "", DIM),
            )
        )
    legs = Text("legs    ", style=DIM)
    for index, leg in enumerate(report["legs"]):
        if index:
            legs.append("   ")
        if leg["status"] == "skipped":
            legs.append(f"{leg['name']} – skipped: {leg['reason']}", style=DIM)
        else:
            statuses = [run["status"] for run in leg["runs"]]
            ended = sum(s in ("complete", "stopped") for s in statuses)
            mark, style = ("✔", GREEN) if leg["status"] == "ok" else ("✘", RED)
            legs.append(f"{leg['name']} ")
            legs.append(mark, style=style)
            legs.append(f" {ended}/{len(statuses)} runs")
            if "stopped" in statuses:
                legs.append(f" ({statuses.count('stopped')} stopped early: fail-fast)", style=DIM)
    lines.append(legs)
    return lines


def _runs_text(groups: list[list[int]]) -> str:
    return " ≠ ".join(",".join(f"#{run}" for run in group) for group in groups)


def divergence_lines(report: dict[str, Any]) -> list[Text]:
    d = report["first_divergence"]
    title = Text("✘ DIVERGED", style=RED)
    title.append(f" at step {d['step']} · {d['phase']} · ", style="bold")
    title.append(d["tensor"], style=RED)
    if report["legs"] and len([leg for leg in report["legs"] if leg["status"] != "skipped"]) > 1:
        title.append(f"   (leg {d['leg']})", style=DIM)
    lines = [title]
    if d["step"]:
        steps = "step 0" if d["step"] == 1 else f"steps 0–{d['step'] - 1}"
        lines.append(_line("before", f"{steps} identical in every recorded phase", style=GREEN))
    total = sum(len(group) for group in d["runs"])
    lines.append(
        _line(
            "runs",
            f"{_runs_text(d['runs'])}",
            Text(f"   ({len(d['runs'])} distinct records in {total} runs)", style=DIM),
        )
    )
    digests = Text()
    for group, digest in zip(d["runs"], d["digests"]):
        short = f"{digest[:4]}…{digest[-4:]}" if digest else "(no record)"
        digests.append(f"#{group[0]} {short}   ")
    lines.append(_line("digest", digests))
    if d["kind"] == "structure":
        shapes = "   ".join(
            f"#{group[0]} "
            + (f"{r['phase']}:{r['tensor']} {r['shape']} {r['dtype']}" if r else "missing")
            for group, r in zip(d["runs"], d["recorded"])
        )
        lines.append(_line("recorded", shapes))
    elif d.get("elements_differing") is not None:
        share = d.get("fraction_differing") or 0.0
        lines.append(
            _line(
                "difference",
                f"max |Δ| {_fmt(d['max_abs_diff'])} · max rel {_fmt(d['max_rel_diff'])} · "
                f"max {_fmt(d['max_ulp'])} ULP · {d['elements_differing']:,} of {d['elements']:,} "
                f"elements ({share:.0%})",
            )
        )
        if d.get("first_index") is not None:
            lines.append(_line("first at", f"index {tuple(d['first_index'])}"))
        sketches = d.get("sketches") or {}
        for run, s in sketches.items():
            lines.append(
                _line(
                    f"#{run}",
                    f"sum {s['sum']:.9g} · sum² {s['sum_sq']:.9g} · absmax {s['absmax']:.9g}"
                    + (f" · {s['nonfinite']} non-finite" if s["nonfinite"] else ""),
                    style=DIM,
                )
            )
        if d.get("replay") == "differed":
            lines.append(
                _line(
                    "replay",
                    "the replay's digests differ from the audited runs': the source does not "
                    "repeat (values shown are the replay's)",
                    style=YELLOW,
                )
            )
    elif d.get("replay") == "failed":
        lines.append(
            _line(
                "difference", "not measured: the replay of the divergent step failed", style=YELLOW
            )
        )
    if d.get("op"):
        zoom = Text(f"module {d['module'] or '–'} → op {d['op']} ({d['stage']})")
        lines.append(_line("zoom", zoom))
    if d.get("source"):
        source = Text(d["source"])
        if d.get("code"):
            source.append(f"   {d['code']}", style=DIM)
        if d.get("source_is_forward_line"):
            source.append("   (the forward line of this backward op)", style=DIM)
        lines.append(_line("source", source))
    if d.get("cause"):
        cause = Text(d["cause"], style="bold")
        if d.get("cause_detail"):
            cause.append(f" — {d['cause_detail']}")
        lines.append(_line("cause", cause))
    if d.get("replays_diverged") == 0:
        lines.append(
            _line(
                "zoom",
                f"the divergence did not recur in {d['replays']} replays: intermittent",
                style=YELLOW,
            )
        )
    shown = d.get("variability") or []
    for index, item in enumerate(shown[:5]):
        groups = " ≠ ".join(",".join(f"#{run}" for run in group) for group in item["runs"])
        lines.append(
            _line(
                "variability" if index == 0 else "",
                Text(f"{item['phase']} · {item['tensor']}: {item['distinct']} distinct ({groups})"),
            )
        )
    if len(shown) > 5:
        lines.append(_line("", f"… {len(shown) - 5} more tensors differ at this step", style=DIM))
    return lines


def failure_lines(report: dict[str, Any]) -> list[Text]:
    lines = []
    failed = [
        (leg, run)
        for leg in report["legs"]
        for run in leg["runs"]
        if run["status"] not in ("complete", "stopped")
    ]
    title = "✘ INTERRUPTED" if report.get("interrupted") else "✘ FAILED"
    lines.append(
        Text(
            f"{title}  {len(failed)} run{'s' if len(failed) != 1 else ''} did not finish", style=RED
        )
    )
    for leg, run in failed[:6]:
        ended = (
            "no step committed" if run["steps"] is None else f"trace keeps steps 0–{run['steps']}"
        )
        lines.append(
            _line(
                f"{leg['name']} #{run['run']}",
                Text(run["error"] or run["status"]),
                Text(f"   ({ended})", style=DIM),
            )
        )
    tail = next((run.get("log_tail") for _, run in failed if run.get("log_tail")), None)
    if tail and tail != [""]:
        for index, line in enumerate(tail[-6:]):
            lines.append(_line("output" if index == 0 else "", Text(line, style=DIM)))
    if len(failed) > 6:
        lines.append(_line("", f"… and {len(failed) - 6} more", style=DIM))
    return lines


def across_table(report: dict[str, Any]) -> Table | None:
    if not report["across_legs"]:
        return None
    table = Table(title=None, box=None, pad_edge=False, show_edge=False)
    for column in ("legs", "tolerance", "verdict", "identical", "worst rel Δ", "first outside"):
        table.add_column(column, style=DIM if column == "legs" else "")
    for c in report["across_legs"]:
        worst = c["worst"]
        outside = c["first_outside"]
        table.add_row(
            " vs ".join(c["pair"]),
            c["tolerance"],
            Text("within", style=GREEN) if c["within_tolerance"] else Text("outside", style=RED),
            f"{c['identical']:,}/{c['compared']:,}",
            Text(f"{_fmt(worst['max_rel_diff'])} at step {worst['step']} {worst['tensor']}")
            if worst
            else Text("0"),
            Text(f"step {outside['step']} · {outside['phase']} · {outside['tensor']}")
            if outside
            else Text("–"),
        )
    return table


def render(report: dict[str, Any], console: Console) -> None:
    """Print the whole report."""
    for line in header(report):
        console.print(line)
    console.print()
    verdict = report["verdict"]
    if verdict == "failed":
        for line in failure_lines(report):
            console.print(line)
        if report.get("first_divergence"):
            console.print()
    if report.get("first_divergence"):
        for line in divergence_lines(report):
            console.print(line)
    elif verdict == "reproducible":
        active = [leg for leg in report["legs"] if leg["status"] == "ok"]
        records = sum(leg["records"] for leg in active)
        runs = sum(len(leg["runs"]) for leg in active)
        steps = max((r["steps"] or 0) for leg in active for r in leg["runs"]) + 1
        phases = len(report["config"]["record"])
        title = Text("✔ REPRODUCIBLE", style="bold green")
        title.append(
            f"  {runs} runs × {steps} steps × {phases} phases · {records:,} digests bitwise "
            "identical"
        )
        console.print(title)
    elif verdict == "diverged":
        console.print(Text("✘ DIVERGED across legs: outside the tolerance", style=RED))
    table = across_table(report)
    if table is not None:
        console.print(_line("across legs", ""))
        console.print(table)
    tried = report.get("attribution") or []
    if tried:
        table = Text()
        for index, item in enumerate(tried):
            if index:
                table.append(" · ")
            fixed = item["verdict"] == "reproducible"
            table.append(f"{item['control']} ")
            table.append("✔ reproduces" if fixed else "✘", style=GREEN if fixed else RED)
        console.print(_line("attribution", table))
    for finding in report.get("findings") or []:
        console.print(_line(finding["code"], Text(finding["message"])))
        if finding.get("fix"):
            console.print(_line("", Text(f"fix: {finding['fix']}"), style=DIM))
    timings = report.get("timings") or {}
    console.print(
        _line(
            "time",
            f"{timings.get('total_s', 0):.1f} s (runs {timings.get('runs_s', 0):.1f} s"
            + (f", replay {timings['measure_s']:.1f} s" if "measure_s" in timings else "")
            + (
                f" from the step-{start} checkpoint"
                if "measure_s" in timings and (start := _replay_from(report))
                else ""
            )
            + (
                f", attribution {timings['attribution_s']:.1f} s"
                if "attribution_s" in timings
                else ""
            )
            + ")",
            style=DIM,
        )
    )
    console.print(_line("traces", Text(report["out_dir"] + "/", style=DIM)))


def _replay_from(report: dict[str, Any]) -> int:
    """The checkpoint step the divergent step's replay started from (0: from the start)."""
    return (report.get("first_divergence") or {}).get("replay_from") or 0
