"""The report for a person: the answer first, the evidence under it, one screen.

Everything that comes from the user's world (tensor, module and file names, error
messages) is printed as literal text, never interpreted as rich markup, with its control
characters and escape sequences shown escaped and a long string cut (report/safe.py).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .. import __version__
from .safe import clean

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


def _threads(report: dict[str, Any]) -> str | None:
    """``1 thread``, ``2 threads``, or ``threads 1,2`` when the legs ran with different
    counts (a leg that left torch's default ran with the environment's count)."""
    env_threads = (report.get("environment") or {}).get("threads")
    counts: list[int] = []
    for leg in report.get("legs") or []:
        if leg.get("status") == "skipped":
            continue
        count = leg.get("threads") or env_threads
        if count and count not in counts:
            counts.append(count)
    if len(counts) > 1:
        return "threads " + ",".join(str(count) for count in counts)
    count = counts[0] if counts else env_threads
    if not count:
        return None
    return f"{count} thread{'s' if count != 1 else ''}"


def _seeding(report: dict[str, Any]) -> str:
    """``seed 0``, or ``unseeded`` when no generator was seeded (``--preset none``)."""
    config = report["config"]
    controls = (report.get("environment") or {}).get("controls") or {}
    seeded = controls.get("seeded")
    if seeded is None:  # no trace says what was applied: go by the preset
        seeded = config.get("preset") != "none"
    return f"seed {config['seed']}" if seeded else "unseeded"


def header(report: dict[str, Any]) -> list[Text]:
    env = report.get("environment") or {}
    cpu = env.get("cpu") or "unknown CPU"
    if env.get("cpu_capability"):
        cpu += f" ({env['cpu_capability']})"
    threads = _threads(report)
    parts = [f"reprocheck {__version__}"]
    if env.get("torch"):
        parts.append(f"torch {env['torch']}")
    if env.get("python"):
        parts.append(f"python {env['python']}")
    parts.append(cpu)
    if threads:
        parts.append(threads)
    config = report["config"]
    steps = f"{config['steps']} steps" if config["steps"] else "all its steps"
    lines = [
        Text(" · ".join(parts), style=DIM),
        Text.assemble(
            ("config  ", DIM),
            (config["name"], "bold"),
            f" ({_seeding(report)}, {config['repeats']} runs × {steps}, preset {config['preset']})",
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
            if leg.get("env"):
                legs.append(
                    "(" + " ".join(f"{k}={v}" for k, v in leg["env"].items()) + ") ", style=DIM
                )
            legs.append(mark, style=style)
            legs.append(f" {ended}/{len(statuses)} runs")
            if "stopped" in statuses:
                legs.append(f" ({statuses.count('stopped')} stopped early: fail-fast)", style=DIM)
    lines.append(legs)
    children = next(
        (
            run["processes"]
            for leg in report["legs"]
            for run in leg["runs"]
            if len(run.get("processes") or ()) > 1
        ),
        None,
    )
    if children:  # the run's own process and the Python processes it started
        lines.append(
            Text.assemble(
                ("process ", DIM),
                " · ".join(
                    p["name"] + (f" ({p['role']})" if p["role"] != "script" else "")
                    for p in children
                ),
                (f"   {len(children)} traces per run", DIM),
            )
        )
    for leg in report["legs"]:  # a torchrun job: one row per run, with its ranks
        for run in leg["runs"]:
            if not run.get("ranks"):
                continue
            row = Text(f"  #{run['run']:<3}", style=DIM)
            for index, rank in enumerate(run["ranks"]):
                ok = rank["status"] == "complete"
                row.append(" · " if index else "")
                row.append(f"rank {rank['rank']} ")
                row.append("✔" if ok else "✘", style=GREEN if ok else RED)
                row.append(f" {rank['steps'] if rank['steps'] is not None else 0} steps", style=DIM)
            where = {r.get("backend") for r in run["ranks"]} - {None}
            if where:
                row.append(f"   {', '.join(sorted(where))}", style=DIM)
            lines.append(row)
    return lines


_KINDS = {
    "comm": "collectives' outputs",
    "grad": "grads",
    "parameter": "parameters",
    "buffer": "buffers",
    "optimizer": "optimizer state",
}


def replica_lines(report: dict[str, Any]) -> list[Text]:
    """The replicas of a data-parallel job, within each run: identical, not checked, or
    the first record they split on (with what still agreed at that step)."""
    check, split = report.get("replicas"), report.get("replica_divergence")
    if not check:
        return []
    if split is None:
        if not check["checked"]:
            return [_line("replicas", f"not checked: {check['note']}", style=DIM)]
        runs = ", ".join(f"#{r}" for r in check["runs"])
        lines = [
            _line(
                "replicas",
                Text.assemble(
                    ("✔ ", GREEN),
                    f"{check['ranks']} ranks bitwise identical in parameters, gradients and "
                    f"optimizer state at every step ({check['records']:,} records, runs {runs})",
                ),
            )
        ]
        if check.get("note"):
            lines.append(_line("", check["note"], style=DIM))
        return lines
    title = Text("✘ REPLICAS DIVERGED", style=RED)
    title.append(
        f" at step {split['step']} · {split['phase']} · {split['tensor']}   ({split['kind']})",
        style="bold",
    )
    groups = " ≠ ".join(",".join(str(r) for r in group) for group in split["ranks"])
    runs = ", ".join(f"#{r}" for r in split["runs"])
    agreed = Text()
    for kind, same in split["agreed"].items():
        if same is None:
            continue
        agreed.append(" · " if agreed.plain else "")
        agreed.append(f"{_KINDS.get(kind, kind)} ")
        agreed.append("✔" if same else "✘", style=GREEN if same else RED)
    lines = [
        title,
        _line("ranks", f"{groups}   (in run{'s' if len(split['runs']) > 1 else ''} {runs})"),
    ]
    lines.append(_line("that step", agreed))
    if not report.get("first_divergence"):
        lines.append(
            _line(
                "run to run",
                "reproducible: rank r of every run agrees with rank r of the others",
                style=DIM,
            )
        )
    return lines


def _runs_text(groups: list[list[int]]) -> str:
    return " ≠ ".join(",".join(f"#{run}" for run in group) for group in groups)


def _change(what: str, then: Any, now: Any) -> str:
    """One change in a script's command since its golden was recorded."""
    if what == "arguments":
        return f"arguments {' '.join(then) or '(none)'} → {' '.join(now) or '(none)'}"
    if what == "script_sha256":
        return f"the script changed (sha256 {str(then)[:12]}… → {str(now)[:12]}…)"
    return f"{what} {then} → {now}"


def golden_lines(report: dict[str, Any]) -> tuple[list[Text], list[Text]]:
    """A golden check (``reprocheck check``): what was compared and, when nothing changed,
    the match (said before the answer); how far apart, per step (after it). A change is
    the report's first divergence, rendered by :func:`divergence_lines`."""
    golden = report.get("golden")
    if not golden:
        return [], []
    lines = [_line("golden", Text(golden["golden"]), Text(f"  ({golden['mode']})", style=DIM))]
    if golden.get("note"):
        lines.append(_line("note", Text(golden["note"]), style=YELLOW))
    for what, (then, now) in (golden.get("changes") or {}).items():
        lines.append(_line("since", Text(_change(what, then, now)), style=YELLOW))
    comparison = golden.get("comparison") or {}
    identical = (
        f"{comparison.get('identical', 0):,} of {comparison.get('compared', 0):,} "
        "records bitwise identical"
    )
    if golden["matches"] and golden["mode"] == "bitwise":
        lines.append(Text(f"✔ MATCHES GOLDEN  {identical}", style="bold green"))
    elif golden["matches"]:
        lines.append(
            Text(
                f"✔ WITHIN TOLERANCE of golden ({comparison.get('tolerance')})  {identical}",
                style="bold green",
            )
        )
    head, lines = lines, []
    worst = comparison.get("worst")
    if worst:
        lines.append(
            _line(
                "worst",
                f"rel Δ {_fmt(worst['max_rel_diff'])} at step {worst['step']} · {worst['tensor']}",
                style=DIM,
            )
        )
    growth = [(s, r) for s, r in comparison.get("growth") or [] if r and r > 0]
    if growth:
        shown = ", ".join(f"{s}: {r:.2g}" for s, r in growth[:8])
        more = " …" if len(growth) > 8 else ""
        lines.append(_line("growth", f"max rel Δ per step — {shown}{more}", style=DIM))
    return head, lines


def _golden_change(d: dict[str, Any]) -> list[Text]:
    """A change against the golden trace: where, and by how much."""
    title = Text("✘ CHANGED against golden", style=RED)
    title.append(f" at step {d['step']} · {d['phase']} · ", style="bold")
    title.append(str(d["tensor"]), style=RED)
    lines = [title]
    if d.get("kind") == "tolerance":
        lines.append(
            _line(
                "difference",
                f"rel Δ {_fmt(d.get('max_rel_diff'))}: outside {d.get('tolerance')} "
                "(the first record outside it)",
            )
        )
        return lines
    if d.get("sketch_rel_diff") is not None:
        lines.append(_line("difference", f"sketch rel Δ {_fmt(d['sketch_rel_diff'])}"))
    digests = d.get("digests") or []
    if len(digests) == 2:
        short = [f"{x[:4]}…{x[-4:]}" if x else "(no record)" for x in digests]
        lines.append(_line("digest", f"golden {short[0]}   this run {short[1]}"))
    if d["step"]:
        lines.append(
            _line("before", f"{_steps(0, d['step'] - 1)} identical to the golden", style=GREEN)
        )
    return lines


def localized_line(report: dict[str, Any]) -> Text | None:
    """Sparse or sampled records: where they put the divergence, and what the replays of
    two runs that disagree found."""
    found = report.get("localized")
    if not isinstance(found, dict):
        return None
    recorded = found.get("recorded") or {}
    text = f"{found.get('recording')}: "
    interval = found.get("interval")
    if interval:
        text += f"the runs first differ in steps {interval[0] + 1}–{interval[1]}"
        if found.get("step") is not None:
            text += f", at step {found['step']}"
    else:
        text += f"the runs first differ at step {recorded.get('step')} · {recorded.get('phase')}"
    replays = found.get("replays") or 0
    text += f"; {replays} replay run{'s' if replays != 1 else ''}"
    if found.get("named"):
        text += " named the tensor"
        return _line("records", text)
    return _line("records", text + f" — the tensor is not named: {found.get('why')}", style=YELLOW)


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}–{last}"


def _before(report: dict[str, Any], step: int) -> str:
    """What the steps before the divergence were found: every step, each phase — or, where
    sampled records were replayed from a checkpoint, the steps before it where hashed."""
    found = report.get("localized")
    start = found.get("every_step_from") if isinstance(found, dict) else None
    if isinstance(start, int) and 0 < start < step:
        return (
            f"{_steps(0, start - 1)} identical where hashed ({found.get('recording')}), "
            f"{_steps(start, step - 1)} at every step, in every observable phase"
        )
    return f"{_steps(0, step - 1)} identical in every observable phase"


def divergence_lines(report: dict[str, Any]) -> list[Text]:
    d = report["first_divergence"]
    if d.get("compared") == "golden":
        return _golden_change(d)
    title = Text("✘ DIVERGED", style=RED)
    process = d.get("process") or "main"
    if d["phase"] == "process":  # one run started a training process another did not
        title.append(" · process ", style="bold")
        title.append(d["tensor"], style=RED)
        title.append(" trained in runs " + _runs_text(d["runs"][:1]) + " only", style="bold")
        return [title]
    title.append(f" at step {d['step']} · {d['phase']} · ", style="bold")
    title.append(d["tensor"], style=RED)
    where = []
    if report["legs"] and len([leg for leg in report["legs"] if leg["status"] != "skipped"]) > 1:
        where.append(f"leg {d['leg']}")
    if process != "main":
        where.append(f"process {process}")
    if where:
        title.append(f"   ({', '.join(where)})", style=DIM)
    lines = [title]
    if d["step"]:
        lines.append(_line("before", _before(report, d["step"]), style=GREEN))
    localized = localized_line(report)
    if localized is not None:
        lines.append(localized)
    total = sum(len(group) for group in d["runs"])
    lines.append(
        _line(
            "runs",
            f"{_runs_text(d['runs'])}",
            Text(f"   ({len(d['runs'])} distinct records in {total} runs)", style=DIM),
        )
    )
    evidence = report.get("evidence")
    if evidence and d.get("compared", "runs") == "runs" and evidence.get("runs", 0) > 2:
        lines.append(_line("evidence", evidence["statement"]))
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
        why = d.get("replay_error")
        lines.append(
            _line(
                "difference",
                "not measured: the replay of the divergent step failed"
                + (f": {why}" if why else ""),
                style=YELLOW,
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
    made = d.get("made_by")
    if made:  # the first differing op belongs to another tensor: the one that made ours
        shapes = ", ".join(f"({', '.join(map(str, s))})" for s in made["first_shapes"])
        line = Text(f"{made['tensor']}: op {made['op']} ({made['stage']}) at {made['source']}")
        if made.get("code"):
            line.append(f"   {made['code']}", style=DIM)
        lines.append(_line("made by", line))
        lines.append(
            _line(
                "",
                f"the op above makes another tensor (shape {shapes}); this one made "
                f"{made['tensor']} (shape ({', '.join(map(str, made['shape']))}))",
                style=DIM,
            )
        )
    if d.get("cause"):
        cause = Text(d["cause"], style="bold")
        if d.get("cause_detail"):
            cause.append(f" — {d['cause_detail']}")
        lines.append(_line("cause", cause))
    if d.get("seeding"):
        lines.append(_line("seeding", Text(d["seeding"])))
    g = d.get("generator")
    if g and g["name"] not in (d.get("cause_detail") or ""):
        lines.append(
            _line(
                "generator",
                f"{g['name']} differed between runs from step {g['step']} "
                f"({_runs_text(g['runs'])})",
            )
        )
    if d.get("rung"):
        lines.append(_line("compiled", d["rung"], style=YELLOW))
        graph = d.get("compiled_output") or {}
        if graph.get("differs"):
            lines.append(
                _line(
                    "",
                    f"compiled graph {graph['graph']} (call {graph['call']}) output "
                    f"{graph['output']} differs first"
                    + (f", from {graph['where']}" if graph.get("where") else ""),
                )
            )
        elif graph:
            lines.append(_line("", graph["note"], style=DIM))
    elif d.get("replays_diverged") == 0:
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
    if report.get("reason") and not failed:  # the runs ended, but what they saw is no audit
        return [Text(f"{title}  {report['reason']}", style=RED)]
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


INDENT = 2  # the across-legs table sits under the report's other lines
_GAP = 2  # between two columns of the table


def _tolerances(report: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(c["tolerance"] for c in report["across_legs"]))


def across_table(report: dict[str, Any], width: int = 100) -> Table | None:
    """One row per pair of legs, at most ``width - INDENT`` columns wide: every cell on
    one line, the two free-text columns (worst, first outside) cut with … where they do
    not fit. One tolerance for every pair is said on the label line, not in a column."""
    if not report["across_legs"]:
        return None
    with_tolerance = len(_tolerances(report)) > 1
    headers = ["legs", "tolerance", "verdict", "identical", "worst rel Δ", "outside from"]
    rows = []
    for c in report["across_legs"]:
        worst = c["worst"]
        outside = c["first_outside"]
        rows.append(
            [
                Text(" vs ".join(c["pair"]), style=DIM),
                Text(c["tolerance"]),
                Text("within", style=GREEN)
                if c["within_tolerance"]
                else Text("outside", style=RED),
                Text(f"{c['identical']:,}/{c['compared']:,}"),
                Text(f"{_fmt(worst['max_rel_diff'])} · step {worst['step']} · {worst['tensor']}")
                if worst
                else Text("0"),
                Text(f"step {outside['step']} · {outside['phase']} · {outside['tensor']}")
                if outside
                else Text("–"),
            ]
        )
    if not with_tolerance:
        del headers[1]
        for row in rows:
            del row[1]
    natural = [
        max([len(name)] + [row[index].cell_len for row in rows])
        for index, name in enumerate(headers)
    ]
    # the short columns keep their width; the two free-text ones share what is left
    fixed = len(headers) - 2
    room = max(width - INDENT - _GAP * (len(headers) - 1) - sum(natural[:fixed]), 2 * 12)
    free = natural[fixed:]
    if sum(free) > room:
        first = max(min(free[0], room // 2), room - free[1])
        free = [first, room - first]
    table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, _GAP // 2))
    for index, name in enumerate(headers):
        table.add_column(
            name,
            no_wrap=True,
            overflow="ellipsis",
            max_width=free[index - fixed] if index >= fixed else None,
        )
    for row in rows:
        table.add_row(*row)
    return table


def _committed_steps(legs: list[dict[str, Any]]) -> str:
    """How many steps the runs committed (step 0 counts): ``21``, or ``20–21`` when the
    runs committed different numbers; ``0`` when none committed any."""
    counts = sorted(
        {(p["steps"] + 1) if p["steps"] is not None else 0 for p in _trained_processes(legs)}
    )
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _trained_processes(legs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's processes that committed a step (a run without any: the run itself)."""
    out = []
    for leg in legs:
        for run in leg["runs"]:
            trained = [p for p in run.get("processes") or () if p["steps"] is not None]
            out.extend(trained or [run])
    return out


def _processes_per_run(legs: list[dict[str, Any]]) -> int:
    runs = [run for leg in legs for run in leg["runs"]]
    trained = _trained_processes(legs)
    return max(1, len(trained) // max(1, len(runs)))


def _recorded_phases(report: dict[str, Any], legs: list[dict[str, Any]]) -> int:
    """The phases the runs recorded (``legs[].phases``), else the ones the config asked for."""
    if any(leg.get("phases") is not None for leg in legs):
        return len({phase for leg in legs for phase in leg.get("phases") or ()})
    return len(report["config"]["record"])


def reproducible_line(
    report: dict[str, Any], title: str = "✔ REPRODUCIBLE", style: str = "bold green"
) -> Text:
    """``✔ REPRODUCIBLE  2 runs × 21 steps × 7 phases · 1,102 digests bitwise identical``:
    what the runs committed, never what was asked for (``⚠ NOT VERIFIED`` heads the same
    line where the runs agreed but the audit could not have seen them differ)."""
    active = [leg for leg in report["legs"] if leg["status"] == "ok"]
    records = sum(leg["records"] for leg in active)
    runs = sum(len(leg["runs"]) for leg in active)
    steps = _committed_steps(active)
    phases = _recorded_phases(report, active)
    processes = _processes_per_run(active)
    title = Text(title, style=style)
    title.append(
        f"  {runs} run{'s' if runs != 1 else ''} × "
        + (f"{processes} processes × " if processes > 1 else "")
        + f"{steps} step{'s' if steps != '1' else ''} × "
        f"{phases} phase{'s' if phases != 1 else ''} · {records:,} digests bitwise identical"
    )
    recording = report["config"].get("recording")
    if recording and recording != "full":  # sparse, or only every M-th step hashed
        title.append(f" ({recording})")
    return title


def evidence_lines(report: dict[str, Any]) -> list[Text]:
    """What a verdict rests on: ``evidence  0 of 2 runs diverged: rate < 78% at 95%``,
    the canary (caught, or missed) and the observer (agrees, or differs)."""
    lines = []
    evidence = report.get("evidence")
    if evidence:
        lines.append(_line("evidence", evidence["statement"]))
    for entry in report.get("coverage") or []:
        if entry["complete"]:
            continue
        where = "" if entry["process"] == "main" else f" (process {entry['process']})"
        for phase, why in entry["missing"].items():
            lines.append(
                _line(
                    "coverage", Text.assemble(("⚠ ", YELLOW), f"{phase} not recorded{where}: {why}")
                )
            )
    canary = report.get("canary")
    if canary:
        caught = [p for p in canary["processes"] if p.get("found") and "why" not in p]
        if canary["caught"]:
            first = caught[0]
            where = f" in {len(caught)} processes" if len(caught) > 1 else ""
            reached = sorted({phase for p in caught for phase in p.get("reached") or []})
            text = Text.assemble(
                ("✔ ", GREEN),
                f"a flipped bit in {first['tensor']} after step {canary['step']} caught at "
                f"step {canary['step']} · weights{where}"
                + (
                    f" (reached {', '.join(reached)} at step {canary['step'] + 1})"
                    if reached
                    else ""
                ),
            )
        else:
            text = Text.assemble(("✘ ", RED), canary.get("why") or "missed")
        lines.append(_line("canary", text))
    observer = report.get("observer")
    if observer:
        if observer["agrees"]:
            text = Text.assemble(
                ("✔ ", GREEN), "a run recording only weights and optimizer state agrees"
            )
        else:
            text = Text.assemble(("✘ ", RED), observer.get("why") or "differs")
        lines.append(_line("observer", text))
    return lines


def as_is_line(report: dict[str, Any]) -> Text | None:
    """``as is  ✔ 2 runs with no preset agree`` / ``⚠ … differ at step 0 · weights``: the
    script run the way its user runs it, after a reproducible verdict under a preset."""
    section = report.get("as_is")
    if not section:
        return None
    first = section.get("first_divergence")
    hashseed = section.get("pythonhashseed")
    how = f"2 runs with no preset (PYTHONHASHSEED {hashseed})"
    if section["verdict"] == "reproducible":
        return _line("as is", Text.assemble(("✔ ", GREEN), f"{how} agree"))
    if first:
        where = f"step {first['step']} · {first['phase']} · {first['tensor']}"
        return _line(
            "as is", Text.assemble(("⚠ ", YELLOW), f"{how} differ at {where} (RC030 below)")
        )
    why = section.get("reason") or section["verdict"]
    return _line("as is", Text.assemble(("? ", DIM), f"{how}: {why}"))


def render(report: dict[str, Any], console: Console) -> None:
    """Print the whole report: every string of it made safe to show first."""
    report = clean(report)
    for line in header(report):
        console.print(line)
    console.print()
    verdict = report["verdict"]
    golden_head, golden_tail = golden_lines(report)
    for line in golden_head:
        console.print(line)
    if verdict == "failed":
        for line in failure_lines(report):
            console.print(line)
        if report.get("first_divergence"):
            console.print()
    if report.get("first_divergence"):
        for line in divergence_lines(report):
            console.print(line)
    elif verdict == "reproducible":
        console.print(reproducible_line(report))
        for line in evidence_lines(report):
            console.print(line)
        line = as_is_line(report)
        if line is not None:
            console.print(line)
    elif verdict == "not_verified":
        console.print(reproducible_line(report, "⚠ NOT VERIFIED", "bold yellow"))
        console.print(_line("reason", Text(report.get("reason") or "")))
        for line in evidence_lines(report):
            console.print(line)
    elif verdict == "diverged" and report["across_legs"]:
        console.print(Text("✘ DIVERGED across legs: outside the tolerance", style=RED))
    for line in replica_lines(report):
        console.print(line)
    for line in golden_tail:
        console.print(line)
    table = across_table(report, console.width)
    if table is not None:
        tolerances = _tolerances(report)
        console.print(
            _line("across legs", f"under {tolerances[0]}" if len(tolerances) == 1 else "")
        )
        console.print(Padding(table, (0, 0, 0, INDENT), expand=False))
        for comparison in report["across_legs"]:
            m = comparison.get("measured") or {}
            if m.get("max_abs_diff") is not None:
                console.print(
                    _line(
                        "measured",
                        f"{' vs '.join(comparison['pair'])} at step {m['step']} · {m['phase']} · "
                        f"{m['tensor']}: max |Δ| {m['max_abs_diff']:.3g} · max "
                        f"{m['max_ulp']:,} ULP · {m['elements_differing']:,} of "
                        f"{m['elements']:,} elements",
                    )
                )
    tried = report.get("attribution") or []
    if tried:
        table = Text()
        for index, item in enumerate(tried):
            if index:
                table.append(" · ")
            fixed = item["verdict"] == "reproducible"
            table.append(f"{item['control']} ")
            if item["verdict"] == "overridden":
                table.append(f"⊘ overridden by {item['overridden_by']}", style=DIM)
            else:
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
            + (
                f", replays to the exact step {timings['localize_s']:.1f} s"
                if "localize_s" in timings
                else ""
            )
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
            + (
                f", canary and observer {timings['checks_s']:.1f} s"
                if "checks_s" in timings
                else ""
            )
            + (f", as is {timings['as_is_s']:.1f} s" if "as_is_s" in timings else "")
            + ")",
            style=DIM,
        )
    )
    console.print(_line("traces", Text(report["out_dir"] + "/", style=DIM)))
    if report.get("html"):
        console.print(_line("report", Text(report["html"], style=DIM)))


def _replay_from(report: dict[str, Any]) -> int:
    """The checkpoint step the divergent step's replay started from (0: from the start)."""
    return (report.get("first_divergence") or {}).get("replay_from") or 0
