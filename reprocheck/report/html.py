"""``report.html``: the audit as one self-contained page — no network reference, nothing
fetched, readable with JavaScript off.

The page is rendered by Jinja2 with autoescaping on (names from user code — modules,
tensors, source lines — are data, shown as text; their control characters shown escaped and
a string past 4,096 characters cut, its length said: report/safe.py) from the report dict
the JSON and the terminal also render (its ``plot`` holds each run's loss per step); it
reads no trace. The plots are matplotlib figures inlined as SVG.
"""

from __future__ import annotations

import functools
import io
import os
import re
from pathlib import Path
from typing import Any, Callable

from .safe import DATA_LIMIT, clean

TEMPLATES = Path(__file__).parent / "templates"
GROUP_COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#718096")


def _series(report: dict[str, Any]) -> dict[str, Any]:
    """The report's plot data as {run: {step: loss}} (a non-finite loss is left out)."""
    plot = report.get("plot") or {}
    runs = [
        {
            "run": r["run"],
            "losses": {s: v for s, v in r["losses"] if v is not None},
            "status": r.get("status"),
        }
        for r in plot.get("runs") or []
    ]
    golden = {s: v for s, v in plot.get("golden") or [] if v is not None}
    sketched = [(s, v) for s, v in plot.get("sketch_growth") or [] if v]
    return {
        "leg": plot.get("leg"),
        "process": plot.get("process"),
        "runs": runs,
        "golden": golden,
        "sketch_growth": sketched,
    }


def _figure_svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # no XML prolog inside HTML
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF: no URLs


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "reprocheck"})
    import matplotlib.pyplot as plt

    return plt


def growth_svg(report: dict[str, Any], series: dict[str, Any]) -> str | None:
    """Each run's loss per step, and |Δ loss| between the disagreeing groups (log scale),
    the first divergent step marked."""
    runs = [r for r in series["runs"] if r["losses"]]
    if not runs:
        return None
    # a run stopped before it recorded a loss still has a place in the legend
    unseen = [r["run"] for r in series["runs"] if not r["losses"]]
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    first = report.get("first_divergence") or {}
    groups = first.get("runs") if first.get("compared") == "runs" else None
    group_of = {
        run: i for i, group in enumerate(groups or [[r["run"] for r in runs]]) for run in group
    }
    two = bool(groups and len(groups) > 1)
    fig, axes = plt.subplots(
        2 if two else 1,
        1,
        figsize=(8, 5.2 if two else 3),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    top = axes[0][0]
    # many runs (`--max-rate`): one legend entry per group that agrees, not one per run
    many = len(runs) > 8
    labelled: set[int] = set()
    for run in runs:
        steps = sorted(run["losses"])
        group = group_of.get(run["run"], 0)
        colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
        size = sum(1 for r in runs if group_of.get(r["run"], 0) == group)
        more = f" and {size - 1} more agreeing" if many and size > 1 else ""
        name = f"run #{run['run']}{more}"
        if many and (group in labelled and run.get("status") != "stopped"):
            name = None
        labelled.add(group)
        top.plot(
            steps,
            [run["losses"][s] for s in steps],
            color=colour,
            lw=1.2,
            # a run stopped early (fail-fast) may hold a step or two: marked, never lost
            marker="." if len(steps) < 60 else None,
            label=None
            if name is None
            else name
            + (f" (stopped at step {steps[-1]})" if run.get("status") == "stopped" else ""),
        )
    if unseen:  # one entry however many (fail-fast stops runs not yet started)
        who = f"run #{unseen[0]}" if len(unseen) == 1 else f"{len(unseen)} runs"
        top.plot([], [], color="#a0aec0", lw=1.2, label=f"{who} (no loss recorded)")
    if series.get("golden"):
        steps = sorted(series["golden"])
        top.plot(
            steps,
            [series["golden"][s] for s in steps],
            color="#1a202c",
            ls="--",
            lw=1,
            label="golden",
        )
    top.set_ylabel("loss")
    top.legend(loc="upper right", fontsize=8, frameon=False)
    step = first.get("step") if first.get("compared") == "runs" else None
    if groups and len(groups) > 1:
        by_run = {r["run"]: r["losses"] for r in runs}
        a, b = by_run.get(groups[0][0], {}), by_run.get(groups[1][0], {})
        common = sorted(set(a) & set(b))
        bottom = axes[1][0]
        gaps = [abs(a[s] - b[s]) for s in common]
        shown = [(s, g) for s, g in zip(common, gaps) if g > 0]
        if shown:
            bottom.semilogy(
                [s for s, _ in shown],
                [g for _, g in shown],
                color="#c53030",
                lw=1.2,
                marker="." if len(shown) < 60 else None,
            )
        sketched = series.get("sketch_growth") or []
        if sketched:
            bottom.semilogy(
                [s for s, _ in sketched],
                [v for _, v in sketched],
                color="#6b46c1",
                lw=1.2,
                label="max relative Δ, all tensors (sketches)",
            )
        if shown and sketched:
            bottom.plot([], [], color="#c53030", label="|Δ loss|")
            bottom.legend(loc="best", fontsize=8, frameon=False)
        if not shown and not sketched:  # no empty log axis: say why there is no curve
            bottom.set_yscale("linear")
            bottom.set_yticks([])
            bottom.text(
                0.5,
                0.5,
                "no |Δ loss| to draw: the losses the two groups recorded are equal at every\n"
                "step both reached (the divergence is in other tensors)"
                if common
                else "no |Δ loss| to draw: the two groups share no step with a recorded loss",
                transform=bottom.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                color="#4a5568",
            )
        bottom.set_ylabel(f"Δ #{groups[0][0]} vs #{groups[1][0]}")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            if step is not None:
                ax.axvline(step, color="#c53030", ls="--", lw=1)
    else:
        top.set_xlabel("step")
        if step is not None:
            top.axvline(step, color="#c53030", ls="--", lw=1)
    for row in axes:
        row[0].grid(alpha=0.25)
        row[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    svg = _figure_svg(fig)
    plt.close(fig)
    return svg


def _rtol(tolerance: str | None) -> float | None:
    found = re.search(r"rtol=([0-9.eE+-]+)", tolerance or "")
    return float(found.group(1)) if found else None


def tolerance_svg(comparisons: list[dict[str, Any]]) -> str | None:
    """Max relative Δ per step of each compared pair (across legs, or against a golden),
    against the tolerance line."""
    shown = [c for c in comparisons if c.get("growth")]
    if not shown:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3), layout="constrained")
    for index, c in enumerate(shown):
        points = [(s, r) for s, r in c["growth"] if r is not None and r > 0]
        label = " vs ".join(c["pair"])
        if points:
            ax.semilogy(
                [s for s, _ in points],
                [r for _, r in points],
                color=GROUP_COLOURS[index % len(GROUP_COLOURS)],
                lw=1.2,
                label=label,
            )
        rtol = _rtol(c.get("tolerance"))
        if rtol:
            ax.axhline(rtol, color="#718096", ls=":", lw=1)
            ax.annotate(
                f"rtol {rtol:g}",
                (0, rtol),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                color="#4a5568",
                va="bottom",
            )
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("max relative Δ")
    ax.grid(alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no difference at any step", ha="center", transform=ax.transAxes)
    svg = _figure_svg(fig)
    plt.close(fig)
    return svg


def _relative(path: str | None, folder: Path) -> str | None:
    if not path:
        return None
    try:
        return os.path.relpath(os.path.abspath(path), folder.resolve())
    except ValueError:
        return path


def page(
    name: str,
    rel: Callable[[Any], str | None],
    undefined_missing: bool = False,
    filters: dict[str, Callable[..., Any]] | None = None,
) -> Any:
    """A page's template, from an environment made once per process (compiling a template
    is half of a page's time): autoescaped, a missing value read as "—" (never ``None`` or
    ``[]``; with ``undefined_missing``, an undefined one too); ``|rel`` makes a link
    relative to the page with ``rel``; ``filters``: the page's own. Render it with
    :func:`render_page`."""
    env = _environment(undefined_missing)
    env.filters.update(filters or {})
    return env.get_template(name), rel


def render_page(found: tuple[Any, Callable[[Any], str | None]], **values: Any) -> str:
    template, rel = found
    return template.render(_rel=rel, **values)


@functools.cache
def _environment(undefined_missing: bool) -> Any:
    from jinja2 import Environment, FileSystemLoader, Undefined, pass_context, select_autoescape

    def finalize(value: Any) -> Any:
        missing = value is None or value == [] or value == {}
        return "—" if missing or (undefined_missing and isinstance(value, Undefined)) else value

    @pass_context
    def rel(context: Any, path: Any) -> str | None:
        return context["_rel"](path)

    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=finalize,
    )
    env.filters["rel"] = rel
    return env


def render_html(
    report: dict[str, Any],
    folder: Path | None = None,
    rules: dict[str, dict[str, str]] | None = None,
) -> str:
    """The page for ``report``; links to traces and logs are relative to ``folder`` (where
    the page is written); ``rules``: the catalog's text of the findings' rules (code →
    why, example, fix), shown in full on the page."""
    from markupsafe import Markup

    report = clean(report, DATA_LIMIT, newlines=True)
    folder = folder or Path(report.get("out_dir") or ".")
    series = _series(report)
    comparisons = list(report.get("across_legs") or [])
    golden = report.get("golden") or {}
    if golden.get("comparison"):
        comparisons.append(golden["comparison"])
    if report.get("comparison"):  # `compare` under a tolerance
        comparisons.append(report["comparison"])
    growth = growth_svg(report, series)
    tolerance = tolerance_svg(comparisons)
    template = page("report.html.j2", lambda path: _relative(path, folder))
    fail_fast_stopped = any(
        run["status"] == "stopped" for leg in report.get("legs") or [] for run in leg["runs"]
    )
    from .. import __version__

    return render_page(
        template,
        version=__version__,
        r=report,
        first=report.get("first_divergence") or (report.get("audit") or {}).get("first_divergence"),
        growth=Markup(growth) if growth else None,
        tolerance=Markup(tolerance) if tolerance else None,
        series=series,
        rules=rules or {},
        stopped=fail_fast_stopped,
        colours=GROUP_COLOURS,
    )


def write_html(
    report: dict[str, Any], path: Path, rules: dict[str, dict[str, str]] | None = None
) -> Path:
    """Write the page (atomically: a crash never leaves half a page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_page(render_html(report, path.parent, rules), path)


def write_page(text: str, path: Path) -> Path:
    """Write a page's text atomically: a crash (a full disk) never leaves half a page."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:  # (a full disk): no half a page left behind
        temporary.unlink(missing_ok=True)
        raise
    return path
