"""``report.html``: written by every audit beside its JSON, self-contained (nothing fetched,
no script), names from user code shown as text; rendered by a real headless Chromium."""

from __future__ import annotations

import copy
import html
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from reprocheck.report.html import render_html

from .conftest import CONFIGS, ROOT, SCRIPTS, run_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((shutil.which(n) for n in BROWSERS if shutil.which(n)), None)


def _page(result) -> str:
    path = Path(result.report["html"])
    assert path.name == "report.html" and path.parent == Path(result.report["out_dir"])
    return path.read_text(encoding="utf-8")


def _self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    # the only URLs are SVG's XML namespaces, never fetched
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)
    assert "default-src 'none'" in page  # the page may not load anything


def test_a_divergent_audit_writes_a_page_naming_the_step_module_op_and_line(audit):
    result = audit("planted-forward.yaml")
    page = _page(result)
    _self_contained(page)
    d = result.report["first_divergence"]
    assert 'id="verdict">DIVERGED</span>' in page and "exit 1" in page
    assert f"step <b>{d['step']}</b> · outputs · <code>output</code>" in page
    assert "<code>ForwardNoise</code> → <code>aten.randn</code>" in page
    assert html.escape(d["source"]) in page
    assert html.escape(d["code"]) in page
    growth = page.split('id="growth-plot">', 1)[1].split("</div>", 1)[0]
    assert growth.lstrip().startswith("<svg") and growth.count("<path") > 3
    assert f"the dashed line marks step {d['step']}, the first divergence" in page
    stopped = any(r["status"] == "stopped" for r in result.report["legs"][0]["runs"])
    assert ("stopped at the divergence (fail-fast)" in page) is stopped
    ops = page.split('id="ops">', 1)[1].split("</table>", 1)[0]
    assert '<tr class="first"><td>4</td><td><code>aten.randn</code>' in ops
    assert "RC015" in page and "in full</summary>" in page  # the rule's text, JS off


def test_names_from_user_code_stay_text(audit):
    report = copy.deepcopy(audit("planted-forward.yaml").report)
    hostile = "<script>alert(1)</script>"
    report["first_divergence"]["module"] = hostile
    report["first_divergence"]["tensor"] = hostile
    report["findings"][0]["message"] = hostile
    page = render_html(report, Path(report["out_dir"]))
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    _self_contained(page)


def test_the_terminal_names_the_page(tmp_path):
    result = run_cli(
        "run", str(CONFIGS / "demo.yaml"), "--steps", "3", "--out", str(tmp_path), "--no-attribute"
    )
    assert result.code == 0
    (page,) = tmp_path.glob("*/report.html")
    assert result.stdout.rstrip().splitlines()[-1].split() == ["report", str(page)]
    _self_contained(page.read_text())
    custom = tmp_path / "elsewhere" / "audit.html"
    again = run_cli(
        "run", str(CONFIGS / "demo.yaml"), "--steps", "2", "-q", "--out", str(tmp_path),
        "--html", str(custom), "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert again.code == 0 and custom.exists() and again.report["html"] == str(custom)
    assert 'id="verdict">REPRODUCIBLE</span>' in custom.read_text()


@pytest.fixture(scope="module")
def golden_check(tmp_path_factory, segment_pool_golden):
    """A script's golden (`record -- python segment_pool.py --lr 0.05`, the session's:
    tests/conftest.py), checked after its learning rate changed."""
    folder = tmp_path_factory.mktemp("golden-html")
    script = str(SCRIPTS / "segment_pool.py")
    golden = shutil.copy(segment_pool_golden, folder / "g.sqlite")
    return run_cli(
        "check", "--against", str(golden), "-q", "--out", str(folder), "--json",
        str(folder / "check.json"), "--", "python", script, "--lr", "0.06",
    )  # fmt: skip


def test_a_golden_check_plots_the_growth_against_the_tolerance(golden_check):
    result = golden_check
    assert result.code == 1
    page = _page(result)
    _self_contained(page)
    assert "First divergence against the golden trace" in page and "golden ≠ current" in page
    plot = page.split('id="tolerance-plot">', 1)[1].split("</div>", 1)[0]
    assert plot.lstrip().startswith("<svg") and "rtol 1e-05" in plot
    growth = result.report["golden"]["comparison"]["growth"]
    # step 0 (the initial state) agrees; every update after it is outside the tolerance
    assert growth[0] == [0, 0.0] and [s for s, rel in growth if rel > 1e-5] == [1, 2, 3]
    assert "golden vs current" in page and "changed: arguments" in page


def test_compare_writes_a_page_only_when_asked(golden_check, tmp_path):
    traces = [r["trace"] for r in golden_check.report["legs"][0]["runs"]]
    plain = run_cli("compare", *traces)
    assert plain.code == 0 and "report" not in plain.stdout
    page = tmp_path / "compare.html"
    result = run_cli("compare", *traces, "--tolerance", "rtol=1e-5,atol=1e-6", "--html", str(page))
    assert result.code == 0 and page.exists()
    assert 'id="verdict">REPRODUCIBLE</span>' in page.read_text()


@pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium (Debian: apt-get install chromium)"
)
def test_chromium_renders_the_page_with_its_plot_and_inert_names(audit, tmp_path):
    report = copy.deepcopy(audit("planted-forward.yaml").report)
    report["first_divergence"]["module"] = "<script>document.title='pwned'</script>"
    page = tmp_path / "report.html"
    page.write_text(render_html(report, Path(report["out_dir"])), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    started = time.monotonic()
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60
    ).stdout
    elapsed = time.monotonic() - started
    assert "DIVERGED" in dom and "aten.randn" in dom and "zoo/planted.py:71" in dom
    assert "<svg" in dom and 'id="growth-plot"' in dom
    assert "pwned" not in dom.split("<title>", 1)[1].split("</title>", 1)[0]  # never ran
    assert "&lt;script&gt;document.title" in dom
    assert elapsed < 5, f"Chromium took {elapsed:.1f} s to load and render the page"
    shots = ROOT / "reports"
    shots.mkdir(exist_ok=True)
    shot = shots / "report-screenshot.png"
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1100,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert shot.stat().st_size > 20_000  # a page with a plot, not a blank one


def test_a_thousand_step_audit_gives_a_small_page_that_renders_fast(tmp_path):
    script = SCRIPTS / "late_noise.py"
    # one thread (the page is about steps, not threads): two runs side by side at torch's
    # default count oversubscribe 2 cores, and 1,000 steps of small ops then crawl (2 s
    # alone, 10–25 s beside other load)
    result = run_cli(
        "exec", "-q", "--no-attribute", "--no-fail-fast", "--no-measure", "--threads", "1",
        "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
        "--", "python", str(script), "--noise-from", "10",
    )  # fmt: skip
    report = result.report
    assert (result.code, report["first_divergence"]["step"]) == (1, 11)
    assert [r["steps"] for r in report["legs"][0]["runs"]] == [1000, 1000]  # the whole growth
    path = Path(report["html"])
    assert path.stat().st_size < 2_000_000
    started = time.monotonic()
    render_html(report, path.parent)
    assert time.monotonic() - started < 2
    if CHROMIUM is not None:
        started = time.monotonic()
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "<svg" in dom and time.monotonic() - started < 2
