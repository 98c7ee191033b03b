"""The cost of the HTML report: what its plot needs in the report, the page's size, and the
time to render it, for audits of 20 and 1,000 steps (a late divergence, --no-fail-fast, so
every step of both runs is plotted).

The plot draws the loss of every run at every step — recorded anyway, one number per step
— so the audit records nothing more for it; the report carries those numbers (`plot`), and
the page is rendered from the report alone. Medians of ``--repeats`` renders.

    python benchmarks/bench_report.py [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _table import table  # benchmarks/, run as a script

SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "scripts" / "late_noise.py"


def audit(folder: Path, steps: int) -> dict:
    report = folder / f"r{steps}.json"
    subprocess.run(
        [
            sys.executable, "-m", "reprocheck", "exec", "-q", "--no-attribute",
            "--no-fail-fast", "--no-measure", "--out", str(folder / "out"),
            "--json", str(report), "--", "python", str(SCRIPT), "--steps", str(steps),
            "--noise-from", "10",
        ],
        check=False,
        capture_output=True,
    )  # fmt: skip
    return json.loads(report.read_text())


def measure(steps_list: list[int], repeats: int) -> list[dict]:
    from reprocheck.report.html import render_html

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for steps in steps_list:
            report = audit(Path(folder), steps)
            page = Path(report["html"])
            without = {k: v for k, v in report.items() if k != "plot"}
            render_html(report, page.parent)  # matplotlib imported once, before timing
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                render_html(report, page.parent)
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "steps": steps,
                    "json_kb": len(json.dumps(report)) / 1024,
                    "plot_kb": (len(json.dumps(report)) - len(json.dumps(without))) / 1024,
                    "html_kb": page.stat().st_size / 1024,
                    "render_s": statistics.median(times),
                }
            )
    return rows


def render(rows: list[dict], markdown: bool) -> str:
    head = ["steps", "report.json KB", "of it the plot's KB", "report.html KB", "render s"]
    body = [
        [
            f"{r['steps']:,}",
            f"{r['json_kb']:.0f}",
            f"{r['plot_kb']:.0f}",
            f"{r['html_kb']:.0f}",
            f"{r['render_s']:.2f}",
        ]
        for r in rows
    ]
    return table(head, body, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = measure(args.steps, args.repeats)
    from reprocheck.determinism import cpu_model

    print(f"{cpu_model()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(render(rows, args.markdown))


if __name__ == "__main__":
    main()
