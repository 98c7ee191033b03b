"""The report of ``reprocheck resume`` (``reprocheck.resume/1``) for a person, for CI and as a
page: does a run resumed from its checkpoint repeat the uninterrupted run bit for bit.

Every renderer here prints only what the report dict holds: a section that is missing or
null prints nothing (the page: "—"), never a guess. Strings from the runs (paths, tensor
names, errors, log lines) are made safe first (report/safe.py), as in the audit's renderers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.text import Text

from .. import __version__
from .github import _escape, _property
from .html import _figure_svg, _pyplot, page, render_page, write_page
from .junit import write_cases
from .safe import DATA_LIMIT, clean
from .terminal import DIM, GREEN, RED, YELLOW, _line

RUNS = ("reference", "stopped", "resumed", "control")
STATES = ("weights", "optimizer", "rng")
TITLES = {
    "equivalent": "✔ RESUME EQUIVALENT",
    "diverged": "✘ RESUME DIVERGED",
    "not_reproducible": "✘ NOT REPRODUCIBLE before the checkpoint",
    "not_verified": "⚠ NOT VERIFIED",
}
EQUIVALENCE, CLASSNAME = "resume equivalence", "reprocheck.resume"


# ---------------------------------------------------------------------------- shared text


def _command(words: Any) -> str | None:
    if not words:
        return None
    return " ".join(str(word) for word in words) if isinstance(words, list) else str(words)


def _where(d: dict[str, Any]) -> str:
    """``step 7 · outputs · output`` (the parts the dict holds)."""
    parts = [f"step {d['step']}"] if d.get("step") is not None else []
    parts += [str(d[key]) for key in ("phase", "tensor") if d.get(key) is not None]
    return " · ".join(parts)


def _divergence(d: dict[str, Any]) -> str:
    """``at step 7 · outputs · output (resumed step 3)``."""
    text = f"at {_where(d)}"
    if d.get("resumed_step") is not None:
        text += f" (resumed step {d['resumed_step']})"
    return text


def _steps_range(first: Any, last: Any) -> str:
    return f"step {first}" if first == last else f"steps {first}…{last}"


def _equivalent_span(report: dict[str, Any]) -> str | None:
    """The steps an equivalent verdict covers: the ones compared, else c+1…N."""
    compared = report.get("compared") or {}
    if compared.get("from") is not None and compared.get("to") is not None:
        return _steps_range(compared["from"], compared["to"])
    c, n = report.get("aligned_step"), report.get("steps")
    if c is not None and n is not None:
        return _steps_range(c + 1, n)
    return None


def _failed_runs(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The runs that did not end ``complete`` (or that carry an error), in run order."""
    runs = report.get("runs") or {}
    return [
        (name, run)
        for name in RUNS
        if isinstance(run := runs.get(name), dict)
        and (run.get("status") not in (None, "complete") or run.get("error"))
    ]


def _run_failure(name: str, run: dict[str, Any]) -> str:
    return f"{name} run {run.get('status') or 'failed'}: {run.get('error') or 'no error recorded'}"


def _missing_text(missing: dict[str, Any]) -> str:
    head = f"missing state {missing.get('state') or 'unknown'}"
    if missing.get("code"):
        head += f" ({missing['code']})"
    return head + (f": {missing['message']}" if missing.get("message") else "")


def _verdict_text(report: dict[str, Any]) -> str | None:
    """One line for CI: the verdict and where (None when the dict holds no verdict)."""
    verdict = report.get("verdict")
    if verdict == "equivalent":
        span = _equivalent_span(report)
        return "resume equivalent" + (f": {span} bit for bit" if span else "")
    if verdict == "diverged":
        first = report.get("first_divergence")
        text = "resume diverged" + (f" {_divergence(first)}" if first else "")
        if report.get("missing"):
            text += f"; {_missing_text(report['missing'])}"
        return text
    if verdict == "not_reproducible":
        before = report.get("before_resume")
        text = "not reproducible before the checkpoint"
        if before:
            text += f": the stopped run differs from the reference at {_where(before)}"
        return text + (f" ({report['reason']})" if report.get("reason") else "")
    if verdict == "not_verified":
        text = "not verified" + (f": {report['reason']}" if report.get("reason") else "")
        reason = str(report.get("reason") or "")
        failed = [  # the runs that failed, where the reason does not already say so
            _run_failure(name, run)
            for name, run in _failed_runs(report)
            if name != "control" and not (run.get("error") and str(run["error"]) in reason)
        ]
        return "; ".join([text, *failed])
    return None


def _control_run_failed(report: dict[str, Any]) -> dict[str, Any] | None:
    run = (report.get("runs") or {}).get("control")
    if isinstance(run, dict) and run.get("status") not in (None, "complete"):
        return run
    return None


# ---------------------------------------------------------------------------- terminal


def _mark(ok: bool) -> Text:
    return Text("✔ " if ok else "✘ ", style=GREEN if ok else RED)


def _run_line(name: str, run: dict[str, Any]) -> Text:
    status = run.get("status")
    parts: list[str | Text] = []
    if status:
        parts += [_mark(status == "complete"), Text(str(status))]
    steps = run.get("steps")
    facts = ["no step committed" if steps is None else _steps_range(0, steps).replace("…", "–")]
    if run.get("seconds") is not None:
        facts.append(f"{run['seconds']:.1f} s")
    parts.append(Text((" · " if parts else "") + " · ".join(facts)))
    if run.get("workdir"):
        parts.append(Text(f"   in {run['workdir']}", style=DIM))
    return _line(name, *parts)


def header_lines(report: dict[str, Any]) -> list[Text]:
    """Version, the two commands, --at, and each run: status, steps, seconds, folder."""
    lines = [Text(f"reprocheck {report.get('version') or __version__} · resume", style=DIM)]
    command = _command(report.get("command"))
    if command:
        lines.append(_line("command", Text(command)))
    resume = _command(report.get("resume_command"))
    if resume:
        lines.append(_line("resume with", Text(resume)))
    if report.get("at") is not None:
        stopped = isinstance((report.get("runs") or {}).get("stopped"), dict)
        lines.append(
            _line(
                "at",
                f"--at {report['at']}" if stopped else f"--resume-at {report['at']}",
                Text(
                    "   stopped after its first checkpoint save at a step ≥ this"
                    if stopped
                    else "   reprocheck's own checkpoint of this step",
                    style=DIM,
                ),
            )
        )
    runs = report.get("runs") or {}
    for name in RUNS:
        if isinstance(runs.get(name), dict):
            lines.append(_run_line(name, runs[name]))
    return lines


def checkpoint_lines(report: dict[str, Any]) -> list[Text]:
    """The checkpoint: its step, each file (writer, keys, what they hold), what was loaded."""
    ckpt = report.get("checkpoint")
    if not ckpt:
        return []
    lines = []
    if ckpt.get("step") is not None:
        lines.append(_line("checkpoint", f"step {ckpt['step']}"))
    for file in ckpt.get("files") or []:
        line = _line("file", Text(str(file.get("file") or "—")))
        if file.get("writer"):
            line.append(f"  ({file['writer']})", style=DIM)
        lines.append(line)
        keys, holds = file.get("keys") or [], file.get("holds") or []
        lines.append(
            _line(
                "",
                Text("keys ", style=DIM),
                Text(", ".join(map(str, keys)) if keys else "—"),
                Text("   holds ", style=DIM),
                Text(", ".join(map(str, holds)) if holds else "—"),
            )
        )
    if "loaded" in ckpt and ckpt["loaded"] is not None:
        loaded = ckpt["loaded"]
        lines.append(
            _line("loaded", Text(", ".join(map(str, loaded))))
            if loaded
            else _line(
                "loaded",
                "no file: the resumed run loaded none through torch.load or safetensors",
                style=YELLOW,
            )
        )
    return lines


def state_lines(report: dict[str, Any]) -> list[Text]:
    """Where the resumed run started (the alignment), its state then, what was compared."""
    lines = []
    c = report.get("aligned_step")
    state = report.get("state_at_resume") or {}
    if c is not None:
        lines.append(_line("aligned", f"resumed from reference step {c}"))
    elif state:  # the resumed run's start was compared: no reference step matched it
        lines.append(
            _line("aligned", "no reference step matched the resumed run's weights", style=YELLOW)
        )
    shown = Text()
    for kind in STATES:
        entry = state.get(kind)
        if not isinstance(entry, dict) or not entry.get("status"):
            continue
        status = str(entry["status"])
        shown.append(" · " if shown.plain else "")
        shown.append(f"{kind} ")
        if status == "equal":
            shown.append("✔ equal", style=GREEN)
        elif status == "differs":
            shown.append("✘ differs", style=RED)
            if entry.get("tensor"):
                shown.append(f" ({entry['tensor']})")
        else:
            shown.append(f"– {status}", style=DIM)
        step = entry.get("step")
        if isinstance(step, int) and step != c:  # a script's generators: after a step
            shown.append(f" after step {step}", style=DIM)
    if shown.plain:
        ckpt_step = (report.get("checkpoint") or {}).get("step")
        against = (
            f"reference step {c}"
            if c is not None
            else f"the checkpoint's step {ckpt_step}"
            if ckpt_step is not None
            else None
        )
        if against:
            shown.append(f"   (vs {against})", style=DIM)
        lines.append(_line("at resume", shown))
    compared = report.get("compared")
    if compared and compared.get("from") is not None and compared.get("to") is not None:
        count = compared.get("steps")
        lines.append(
            _line(
                "compared",
                f"reference {_steps_range(compared['from'], compared['to']).replace('…', '–')}",
                Text(f"   ({count} step{'s' if count != 1 else ''})", style=DIM)
                if count is not None
                else "",
            )
        )
    return lines


def _finding_lines(label: str, finding: dict[str, Any]) -> list[Text]:
    lines = []
    if finding.get("message"):
        lines.append(_line(label, Text(str(finding["message"]))))
        label = ""
    if finding.get("fix"):
        lines.append(_line(label, Text(f"fix: {finding['fix']}"), style=DIM))
    return lines


def verdict_lines(report: dict[str, Any]) -> list[Text]:
    """The answer: equivalent, diverged (and the state the checkpoint missed), not
    reproducible before the checkpoint, or not verified (and why); then a latent warning."""
    verdict = report.get("verdict")
    lines: list[Text] = []
    if verdict == "equivalent":
        title = Text(TITLES[verdict], style="bold green")
        span = _equivalent_span(report)
        if span:
            title.append(f"  {span} bit for bit")
        lines.append(title)
    elif verdict == "diverged":
        title = Text(TITLES[verdict], style=RED)
        first = report.get("first_divergence")
        if first:
            title.append(f" at {_where(first)}", style="bold")
            if first.get("resumed_step") is not None:
                title.append(f" (resumed step {first['resumed_step']})", style="bold")
            if first.get("kind") == "structure":
                title.append("   (structure)", style=DIM)
        lines.append(title)
        compared = report.get("compared") or {}
        start = compared.get("from")
        if first and start is not None and first.get("step") is not None and first["step"] > start:
            lines.append(
                _line(
                    "before",
                    f"reference {_steps_range(start, first['step'] - 1).replace('…', '–')} "
                    "identical after the resume",
                    style=GREEN,
                )
            )
        missing = report.get("missing")
        if missing:
            head = Text(str(missing.get("state") or "unknown"), style="bold")
            if missing.get("code"):
                head.append(f" — {missing['code']}")
            if missing.get("name"):
                head.append(f" {missing['name']}", style=DIM)
            lines.append(_line("missing", head))
            lines += _finding_lines("", missing)
    elif verdict == "not_reproducible":
        title = Text(TITLES[verdict], style=RED)
        before = report.get("before_resume")
        if before:
            title.append(
                f"  the stopped run differs from the reference at {_where(before)}", style="bold"
            )
        lines.append(title)
        if report.get("reason"):
            lines.append(_line("reason", Text(str(report["reason"]))))
    elif verdict == "not_verified":
        lines.append(Text(TITLES[verdict], style="bold yellow"))
        if report.get("reason"):
            lines.append(_line("reason", Text(str(report["reason"]))))
    elif verdict:
        lines.append(Text(str(verdict), style="bold"))
    latent = report.get("latent")
    if latent:
        text = Text("⚠ ", style=YELLOW)
        text.append(f"generator state {latent.get('tensor') or '—'} differs")
        if latent.get("step") is not None:
            text.append(f" at step {latent['step']}")
        text.append(" while every record matched")
        lines.append(_line("latent", text))
    return lines


def control_lines(report: dict[str, Any]) -> list[Text]:
    """The control run: what it disturbed, whether it was applied (why not), where it
    diverged, and its statement (a match proves less)."""
    control = report.get("control")
    if not control:
        return []
    what = str(control.get("what") or "state")
    text = Text(f"{what} ")
    statement_style = ""
    if not control.get("applied"):
        text.append("⚠ not applied", style=YELLOW)
        if control.get("reason"):
            text.append(f": {control['reason']}")
    else:
        text.append("disturbed at the resume: ")
        diverged = control.get("diverged")
        first = control.get("first_divergence")
        if diverged:
            text.append("✔ diverged", style=GREEN)
            if first:
                text.append(f" {_divergence(first)}")
        elif diverged is False:
            text.append("⚠ matched the reference", style=YELLOW)
            statement_style = YELLOW
        else:
            failed = _control_run_failed(report)
            text.append(
                f"✘ no result: the control run {failed.get('status')}" if failed else "no result",
                style=RED if failed else DIM,
            )
    lines = [_line("control", text)]
    if control.get("statement"):
        lines.append(_line("", Text(str(control["statement"])), style=statement_style))
    return lines


def failure_lines(report: dict[str, Any]) -> list[Text]:
    """Each run that did not complete: its error and the end of its output."""
    lines = []
    for name, run in _failed_runs(report):
        steps = run.get("steps")
        ended = "no step committed" if steps is None else f"trace keeps steps 0–{steps}"
        lines.append(
            _line(
                name,
                Text("✘ ", style=RED),
                Text(str(run.get("error") or run.get("status") or "failed")),
                Text(f"   ({ended})", style=DIM),
            )
        )
        tail = [str(line) for line in run.get("log_tail") or []]
        if tail and tail != [""]:
            for index, line in enumerate(tail[-6:]):
                lines.append(_line("output" if index == 0 else "", Text(line, style=DIM)))
    return lines


def _other_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The findings besides the one the verdict already shows as the missing state."""
    missing = report.get("missing") or {}
    same = (missing.get("code"), missing.get("message"))
    return [
        f
        for f in report.get("findings") or []
        if isinstance(f, dict) and (not missing or (f.get("code"), f.get("message")) != same)
    ]


def render(report: dict[str, Any], console: Console) -> None:
    """Print the whole report: every string of it made safe to show first."""
    report = clean(report)
    sections = [
        header_lines(report),
        checkpoint_lines(report) + state_lines(report),
        verdict_lines(report) + control_lines(report),
        failure_lines(report),
    ]
    for finding in _other_findings(report):
        sections[-1] += _finding_lines(str(finding.get("code") or "finding"), finding)
    tail = []
    if report.get("seconds") is not None:
        tail.append(_line("time", f"{report['seconds']:.1f} s", style=DIM))
    if report.get("out_dir"):
        tail.append(_line("traces", Text(f"{report['out_dir']}/", style=DIM)))
    if report.get("html"):
        tail.append(_line("report", Text(str(report["html"]), style=DIM)))
    sections.append(tail)
    first = True
    for section in sections:
        if not section:
            continue
        if not first:
            console.print()
        first = False
        for line in section:
            console.print(line)


# ---------------------------------------------------------------------------- JUnit, GitHub


def cases(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The test cases: ``resume equivalence`` and, with a control, ``resume control[what]``;
    each {name, failure?, kind? ("failure" | "error"), skipped?, out?, time}."""
    runs = report.get("runs") or {}

    def seconds(*names: str) -> float:
        return sum(
            float((runs.get(n) or {}).get("seconds") or 0)
            for n in names
            if isinstance(runs.get(n), dict)
        )

    verdict = report.get("verdict")
    case: dict[str, Any] = {
        "name": EQUIVALENCE,
        "time": seconds("reference", "stopped", "resumed"),
    }
    text = _verdict_text(report)
    if verdict in ("diverged", "not_reproducible"):
        case.update(failure=text, kind="failure")
    elif verdict != "equivalent":  # not_verified (or a verdict this schema does not name)
        case.update(failure=text or f"no verdict ({verdict})", kind="error")
    else:
        case["out"] = text
    if report.get("latent"):
        latent = report["latent"]
        note = (
            f"latent: generator state {latent.get('tensor')} differs at step {latent.get('step')}"
        )
        case["out"] = f"{case['out']}\n{note}" if case.get("out") else note
    out = [case]
    control = report.get("control")
    if control:
        what = control.get("what") or "state"
        item: dict[str, Any] = {"name": f"resume control[{what}]", "time": seconds("control")}
        failed = _control_run_failed(report)
        if failed:
            item.update(failure=_run_failure("control", failed), kind="error")
        elif not control.get("applied"):
            item["skipped"] = "not applied" + (
                f": {control['reason']}" if control.get("reason") else ""
            )
        elif control.get("diverged") is None:
            item["skipped"] = "no result"
        if control.get("statement"):
            item["out"] = str(control["statement"])
        out.append(item)
    return out


def write_junit(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as a JUnit XML file (testsuites/testsuite/testcase)."""
    report = clean(report)
    write_cases(cases(report), CLASSNAME, float(report.get("seconds") or 0), path)


def _script(command: Any) -> str | None:
    """The command's first ``.py`` or ``.ipynb`` word (a config's command: its ``.yaml``
    path): the file an annotation points at."""
    for word in command if isinstance(command, list) else []:
        if str(word).endswith((".py", ".ipynb", ".yaml", ".yml")):
            return str(word)
    return None


def annotations(report: dict[str, Any]) -> list[str]:
    """``::error`` per failing case, ``::warning`` for a latent difference and for a
    control that matched, ``::notice`` for an equivalent resume; one line each."""
    report = clean(report)
    script = _script(report.get("command"))
    where = f"file={_property(script)}," if script else ""
    lines = []
    for case in cases(report):
        if "failure" in case:
            lines.append(
                f"::error {where}title={_property(case['name'])}::{_escape(case['failure'])}"
            )
    latent = report.get("latent")
    if latent:
        lines.append(
            f"::warning {where}title={_property(EQUIVALENCE)}::"
            + _escape(
                f"generator state {latent.get('tensor')} differs at step {latent.get('step')} "
                "while every record matched"
            )
        )
    control = report.get("control") or {}
    if control.get("applied") and control.get("diverged") is False:
        title = f"resume control[{control.get('what') or 'state'}]"
        lines.append(
            f"::warning {where}title={_property(title)}::"
            + _escape(str(control.get("statement") or "the control matched the reference"))
        )
    if report.get("verdict") == "equivalent":
        lines.append(
            f"::notice {where}title={_property(EQUIVALENCE)}::"
            + _escape(_verdict_text(report) or "resume equivalent")
        )
    return lines


# ---------------------------------------------------------------------------- HTML

TEMPLATE = "resume.html.j2"
COLOURS = {
    "reference": "#2b6cb0",
    "stopped": "#718096",
    "resumed": "#c05621",
    "control": "#2f855a",
}


def _points(series: Any) -> list[tuple[float, float]]:
    """``[[step, loss], …]`` as finite numeric pairs (a null or non-finite loss left out)."""
    out = []
    for pair in series or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            continue
        step, loss = pair
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
        if numeric and math.isfinite(step) and math.isfinite(loss):
            out.append((step, loss))
    return sorted(out)


def losses_svg(report: dict[str, Any]) -> str | None:
    """The reference's, the resumed run's and the control's loss (the stopped run's, where the
    report holds it: not reproducible before the checkpoint) against the reference step,
    the resume (or checkpoint) step and the first divergence marked; None: no loss to draw."""
    losses = report.get("losses") or {}
    curves = {name: _points(losses.get(name)) for name in COLOURS}
    if not any(curves.values()):
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3.2), layout="constrained")
    for name, points in curves.items():
        if not points:
            continue
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            color=COLOURS[name],
            lw=1.4 if name == "reference" else 1.2,
            ls="--" if name in ("control", "stopped") else "-",
            marker="." if len(points) < 60 else None,
            label=name,
        )
    c = report.get("aligned_step")
    ckpt = (report.get("checkpoint") or {}).get("step")
    if isinstance(c, int):
        ax.axvline(c, color="#4a5568", ls=":", lw=1.2, label=f"resumed from step {c}")
    elif isinstance(ckpt, int):
        ax.axvline(ckpt, color="#4a5568", ls=":", lw=1.2, label=f"checkpoint at step {ckpt}")
    first = (report.get("first_divergence") or {}).get("step")
    if isinstance(first, int):
        ax.axvline(first, color="#c53030", ls="--", lw=1, label=f"first divergence, step {first}")
    ax.set_xlabel("reference step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.25)
    ax.legend(loc="best", fontsize=8, frameon=False)
    svg = _figure_svg(fig)
    plt.close(fig)
    return svg


def _link(path: Any, folder: Path) -> str | None:
    """``path`` relative to the page's folder, as a URL path (``:``, ``#``, ``?`` quoted:
    a name never reads as a scheme or a fragment)."""
    if not path:
        return None
    try:
        relative = os.path.relpath(os.path.abspath(str(path)), folder.resolve())
    except ValueError:  # another drive
        relative = str(path)
    return quote(relative.replace(os.sep, "/"))


def render_html(report: dict[str, Any], folder: Path | None = None) -> str:
    """The page for ``report``; links to traces and logs are relative to ``folder`` (where
    the page is written; by default the report's out_dir)."""
    from markupsafe import Markup

    report = clean(report, DATA_LIMIT, newlines=True)
    folder = Path(folder or report.get("out_dir") or ".")
    svg = losses_svg(report)
    template = page(
        TEMPLATE,
        lambda path: _link(path, folder),
        undefined_missing=True,
        filters={"command": _command},
    )
    runs = report.get("runs") or {}
    return render_page(
        template,
        version=__version__,
        r=report,
        title=TITLES.get(report.get("verdict") or "", report.get("verdict")),
        span=_equivalent_span(report),
        runs=[(name, runs[name]) for name in RUNS if isinstance(runs.get(name), dict)],
        failed=_failed_runs(report),
        findings=_other_findings(report),
        states=[(kind, (report.get("state_at_resume") or {}).get(kind)) for kind in STATES],
        control_failed=_control_run_failed(report),
        losses=Markup(svg) if svg else None,
        curves=[name for name in COLOURS if _points((report.get("losses") or {}).get(name))],
    )


def write_html(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the page (atomically: a crash never leaves half a page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_page(render_html(report, path.parent), path)
