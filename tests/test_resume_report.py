"""The renderers of ``reprocheck resume``'s report (reprocheck.resume/1): terminal, JUnit,
GitHub annotations and the page, on hand-built reports — what they say, and only that."""

from __future__ import annotations

import copy
import io
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

from rich.console import Console

from reprocheck.report import resume

ROOT = "/abs/reports/resume-1"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "source", "wbr"}


def _run(name: str, steps: int | None, seconds: float, root: str = ROOT, **more) -> dict:
    return {
        "trace": f"{root}/{name}/trace.sqlite",
        "log": f"{root}/{name}/log.txt",
        "workdir": f"{root}/{name}/work",
        "status": "complete",
        "steps": steps,
        "seconds": seconds,
        "error": None,
        "log_tail": [],
        **more,
    }


def _state(rng: str = "equal", tensor: str | None = None) -> dict:
    return {
        "weights": {"status": "equal", "tensor": None},
        "optimizer": {"status": "equal", "tensor": None},
        "rng": {"status": rng, "tensor": tensor},
    }


MISSING = {
    "state": "rng",
    "code": "RC032",
    "name": "resume-rng-not-restored",
    "severity": "error",
    "message": "the checkpoint does not hold the random generators' state",
    "fix": "save torch.get_rng_state() with the checkpoint and restore it on resume",
    "evidence": {"tensor": "torch.cpu"},
}


def equivalent(root: str = ROOT) -> dict:
    return {
        "schema": "reprocheck.resume/1",
        "version": "0.9",
        "verdict": "equivalent",
        "exit_code": 0,
        "reason": None,
        "command": ["python", "train.py", "--steps", "12"],
        "resume_command": ["python", "train.py", "--steps", "12", "--resume"],
        "at": 4,
        "steps": 12,
        "out_dir": root,
        "seconds": 12.3,
        "runs": {
            "reference": _run("reference", 12, 3.1, root),
            "stopped": _run("stopped", 4, 1.2, root),
            "resumed": _run("resumed", 8, 2.0, root),
            "control": _run("control", 8, 2.1, root),
        },
        "checkpoint": {
            "step": 4,
            "files": [
                {
                    "file": f"{root}/stopped/work/ckpt.pt",
                    "writer": "torch.save",
                    "keys": ["model", "optimizer", "step", "rng"],
                    "holds": ["weights", "optimizer", "rng"],
                }
            ],
            "loaded": [f"{root}/stopped/work/ckpt.pt"],
        },
        "aligned_step": 4,
        "state_at_resume": _state(),
        "compared": {"from": 5, "to": 12, "steps": 8},
        "first_divergence": None,
        "latent": None,
        "before_resume": None,
        "missing": None,
        "control": {
            "what": "rng",
            "applied": True,
            "reason": None,
            "diverged": True,
            "first_divergence": {
                "step": 5,
                "resumed_step": 1,
                "phase": "outputs",
                "tensor": "output",
                "kind": "value",
            },
            "statement": "the rng control diverged at step 5 · outputs · output: the audit "
            "sees a resume that loses the generators",
        },
        "losses": {
            "reference": [[0, None]] + [[s, 3.0 - 0.1 * s] for s in range(1, 13)],
            "resumed": [[s, 3.0 - 0.1 * s] for s in range(5, 13)],
            "control": [[s, 3.05 - 0.1 * s] for s in range(5, 13)],
        },
        "findings": [],
    }


def diverged(root: str = ROOT) -> dict:
    report = equivalent(root)
    report.update(
        verdict="diverged",
        exit_code=1,
        state_at_resume=_state("differs", "torch.cpu"),
        first_divergence={
            "step": 7,
            "resumed_step": 3,
            "phase": "outputs",
            "tensor": "output",
            "kind": "value",
        },
        missing=copy.deepcopy(MISSING),
        control={
            "what": "data",
            "applied": False,
            "reason": "the run fetched no DataLoader batch",
            "diverged": None,
            "first_divergence": None,
            "statement": None,
        },
        findings=[
            copy.deepcopy(MISSING),
            {
                "code": "RC040",
                "name": "checkpoint-no-scheduler",
                "severity": "warning",
                "message": "the checkpoint holds no learning-rate scheduler",
                "fix": "save scheduler.state_dict()",
                "evidence": {},
            },
        ],
    )
    report["checkpoint"]["files"][0].update(keys=["model", "optimizer"], holds=["weights"])
    report["losses"]["resumed"] = [
        [s, 3.0 - 0.1 * s + (0.02 if s >= 7 else 0)] for s in range(5, 13)
    ]
    del report["losses"]["control"]
    del report["runs"]["control"]
    return report


def not_verified(root: str = ROOT) -> dict:
    report = equivalent(root)
    report.update(
        verdict="not_verified",
        exit_code=3,
        reason="the resumed run failed",
        aligned_step=None,
        state_at_resume=None,
        compared=None,
        control=None,
        losses={"reference": [[s, 3.0 - 0.1 * s] for s in range(13)]},
    )
    report["checkpoint"]["loaded"] = []
    del report["runs"]["control"]
    report["runs"]["resumed"] = _run(
        "resumed",
        None,
        0.4,
        root,
        status="failed",
        error="RuntimeError: Error(s) in loading state_dict",
        log_tail=["Traceback (most recent call last):", "RuntimeError: Error(s) in loading"],
    )
    return report


HOSTILE = "\x1b[2J\x1b]0;pwned\x07<script>alert(1)</script>"


def hostile(root: str = ROOT) -> dict:
    report = diverged(root)
    report["command"] = ["python", "train.py", "--name", "a\nb"]
    report["first_divergence"]["tensor"] = HOSTILE
    report["missing"]["message"] = HOSTILE
    report["checkpoint"]["files"][0]["keys"] = [HOSTILE]
    report["control"] = {
        "what": "rng",
        "applied": True,
        "reason": None,
        "diverged": False,
        "first_divergence": None,
        "statement": f"the rng control matched: {HOSTILE} proves less",
    }
    report["runs"]["stopped"].update(
        status="killed", error=f"killed {HOSTILE}", log_tail=[f"\x1b[31m{HOSTILE}"]
    )
    report["findings"][1]["message"] = HOSTILE
    return report


def _terminal(report: dict) -> list[str]:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    resume.render(report, console)
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


# ---------------------------------------------------------------------------- terminal


def test_an_equivalent_resume_says_which_steps_match_bit_for_bit():
    lines = _terminal(equivalent())
    assert lines[0] == "reprocheck 0.9 · resume"
    for expected in (
        "  command     python train.py --steps 12",
        "  resume with python train.py --steps 12 --resume",
        "  at          --at 4   stopped after its first checkpoint save at a step ≥ this",
        f"  reference   ✔ complete · steps 0–12 · 3.1 s   in {ROOT}/reference/work",
        f"  stopped     ✔ complete · steps 0–4 · 1.2 s   in {ROOT}/stopped/work",
        "  checkpoint  step 4",
        f"  file        {ROOT}/stopped/work/ckpt.pt  (torch.save)",
        "              keys model, optimizer, step, rng   holds weights, optimizer, rng",
        f"  loaded      {ROOT}/stopped/work/ckpt.pt",
        "  aligned     resumed from reference step 4",
        "  at resume   weights ✔ equal · optimizer ✔ equal · rng ✔ equal   (vs reference step 4)",
        "  compared    reference steps 5–12   (8 steps)",
        "✔ RESUME EQUIVALENT  steps 5…12 bit for bit",
        "  control     rng disturbed at the resume: ✔ diverged at step 5 · outputs · output "
        "(resumed step 1)",
        "  time        12.3 s",
        f"  traces      {ROOT}/",
    ):
        assert expected in lines, expected
    assert not any("DIVERGED" in line or "NOT VERIFIED" in line for line in lines)


def test_a_diverged_resume_names_the_step_and_the_missing_state():
    lines = _terminal(diverged())
    title = lines.index("✘ RESUME DIVERGED at step 7 · outputs · output (resumed step 3)")
    assert lines[title + 1 : title + 5] == [
        "  before      reference steps 5–6 identical after the resume",
        "  missing     rng — RC032 resume-rng-not-restored",
        "              the checkpoint does not hold the random generators' state",
        "              fix: save torch.get_rng_state() with the checkpoint and restore it on "
        "resume",
    ]
    assert (
        "  at resume   weights ✔ equal · optimizer ✔ equal · rng ✘ differs (torch.cpu)   "
        "(vs reference step 4)"
    ) in lines
    assert "  control     data ⚠ not applied: the run fetched no DataLoader batch" in lines
    # the missing state is shown once; the other findings after it
    assert sum("RC032" in line for line in lines) == 1
    assert "  RC040       the checkpoint holds no learning-rate scheduler" in lines
    assert "EQUIVALENT" not in "\n".join(lines)


def test_not_verified_says_why_and_shows_the_failed_run_and_nothing_unchecked():
    lines = _terminal(not_verified())
    text = "\n".join(lines)
    assert "⚠ NOT VERIFIED" in lines
    assert "  reason      the resumed run failed" in lines
    assert (
        "  resumed     ✘ RuntimeError: Error(s) in loading state_dict   (no step committed)"
    ) in lines
    assert "  output      Traceback (most recent call last):" in lines
    assert "              RuntimeError: Error(s) in loading" in lines
    assert (
        "  loaded      no file: the resumed run loaded none through torch.load or safetensors"
    ) in lines
    # no alignment, state, comparison or control was made: none is stated
    for word in ("aligned", "at resume", "compared", "control", "matched", "EQUIVALENT"):
        assert word not in text, word


def test_a_report_with_its_sections_null_prints_only_what_it_holds():
    report = {
        "schema": "reprocheck.resume/1",
        "verdict": "not_verified",
        "exit_code": 3,
        "reason": "no checkpoint saved at or after step 4",
        "command": ["python", "train.py"],
        "at": 4,
        "steps": None,
        "checkpoint": None,
        "aligned_step": None,
        "state_at_resume": None,
        "compared": None,
        "control": None,
        "runs": {},
    }
    lines = _terminal(report)
    assert "⚠ NOT VERIFIED" in lines
    assert "  reason      no checkpoint saved at or after step 4" in lines
    assert not any(
        word in line for line in lines for word in ("checkpoint  ", "aligned", "control", "time")
    )
    assert resume.render_html(report, Path("/tmp")).count("<svg") == 0


def test_escape_sequences_from_the_runs_never_reach_the_terminal():
    console = Console(file=io.StringIO(), width=120, color_system="truecolor", force_terminal=True)
    resume.render(hostile(), console)
    raw = console.file.getvalue()
    shown = "\\x1b[2J\\x1b]0;pwned\\x07<script>alert(1)</script>"
    assert "\x1b[2J" not in raw and "\x07" not in raw and "]0;pwned" not in raw.replace(shown, "")
    lines = [line.rstrip() for line in _terminal(hostile())]
    assert f"✘ RESUME DIVERGED at step 7 · outputs · {shown} (resumed step 3)" in lines
    assert "  command     python train.py --name a\\nb" in lines
    assert f"  output      \\x1b[31m{shown}" in lines
    assert (
        "  control     rng disturbed at the resume: ⚠ matched the reference" in lines
        and f"              the rng control matched: {shown} proves less" in lines
    )


# ---------------------------------------------------------------------------- JUnit, GitHub


def _junit(report: dict, tmp_path: Path) -> ET.Element:
    path = tmp_path / "junit.xml"
    resume.write_junit(report, path)
    return ET.parse(path).getroot()


def test_junit_passes_an_equivalent_resume_and_keeps_the_control_statement(tmp_path):
    root = _junit(equivalent(), tmp_path)
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "0", "0")
    assert root.get("time") == "12.300"
    names = [case.get("name") for case in root.iter("testcase")]
    assert names == ["resume equivalence", "resume control[rng]"]
    control = root.findall(".//testcase")[1]
    assert control.find("failure") is None and control.find("error") is None
    assert "loses the generators" in control.find("system-out").text


def test_junit_fails_a_diverged_resume_with_the_missing_state(tmp_path):
    root = _junit(diverged(), tmp_path)
    assert (root.get("failures"), root.get("errors"), root.get("skipped")) == ("1", "0", "1")
    failure = root.find(".//testcase[@name='resume equivalence']/failure")
    assert failure.get("message") == (
        "resume diverged at step 7 · outputs · output (resumed step 3); missing state rng "
        "(RC032): the checkpoint does not hold the random generators' state"
    )
    skipped = root.find(".//testcase[@name='resume control[data]']/skipped")
    assert skipped.get("message") == "not applied: the run fetched no DataLoader batch"


def test_junit_errors_when_not_verified_and_a_matched_control_is_no_failure(tmp_path):
    root = _junit(not_verified(), tmp_path)
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("1", "0", "1")
    error = root.find(".//testcase/error")
    assert error.get("message") == (
        "not verified: the resumed run failed; resumed run failed: "
        "RuntimeError: Error(s) in loading state_dict"
    )
    root = _junit(hostile(), tmp_path)  # parses despite the control characters
    control = root.find(".//testcase[@name='resume control[rng]']")
    assert control.find("failure") is None and "proves less" in control.find("system-out").text
    assert "\\x1b[2J" in root.find(".//failure").get("message")


def test_annotations_are_one_line_each_and_point_at_the_script():
    assert resume.annotations(equivalent()) == [
        "::notice file=train.py,title=resume equivalence::resume equivalent: steps 5…12 bit for bit"
    ]
    lines = resume.annotations(diverged())
    assert lines == [
        "::error file=train.py,title=resume equivalence::resume diverged at step 7 · outputs · "
        "output (resumed step 3); missing state rng (RC032): the checkpoint does not hold the "
        "random generators' state"
    ]
    lines = resume.annotations(hostile())
    assert [line.split("::")[1].split(" ")[0] for line in lines] == ["error", "warning"]
    assert all("\n" not in line and "\r" not in line and "\x1b" not in line for line in lines)
    report = not_verified()
    report["command"] = ["bash", "run.sh"]  # no script to point at
    assert resume.annotations(report)[0].startswith("::error title=resume equivalence::")


# ---------------------------------------------------------------------------- HTML


class _Page(HTMLParser):
    """Tags balanced, and every link and id on the page."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "href" in attrs:
            self.links.append(attrs["href"])
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (self.open[-5:], tag)
        self.open.pop()


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.open == []
    return parser


def test_the_page_shows_the_verdict_the_loss_figure_and_relative_links(tmp_path):
    root = str(tmp_path / "resume-1")
    path = resume.write_html(equivalent(root), Path(root) / "resume.html")
    assert path.exists() and not path.with_name("resume.html.tmp").exists()
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert 'id="verdict">✔ RESUME EQUIVALENT</span>' in page and "exit 0" in page
    assert "steps 5…12 bit for bit" in page
    assert "resumed from reference step 4" in page
    plot = page.split('id="loss-plot">', 1)[1].split("</div>", 1)[0]
    assert plot.lstrip().startswith("<svg") and plot.count("<path") > 3
    assert "resumed from step 4" in plot and "reference step" in plot
    assert {"summary", "answer", "control", "runs", "checkpoint", "state"} <= parsed.ids
    assert "reference/trace.sqlite" in parsed.links and "resumed/log.txt" in parsed.links
    assert all(not link.startswith(("/", "file:", "http")) for link in parsed.links)
    assert "<script" not in page.lower() and "default-src 'none'" in page


def test_the_page_of_a_divergence_names_the_missing_state_and_says_dash_for_nothing():
    page = resume.render_html(diverged(), Path(ROOT))
    _parse(page)
    assert 'id="verdict">✘ RESUME DIVERGED</span>' in page
    assert "at step 7 · outputs · <code>output</code> (resumed step 3)" in page
    assert "<tr><th>missing state</th><td><b>rng</b></td></tr>" in page
    assert "no</span>: the run fetched no DataLoader batch" in page
    page = resume.render_html(not_verified(), Path(ROOT))
    _parse(page)
    assert 'id="aligned">—</td>' in page and 'id="compared">—</td>' in page
    assert "None" not in page.replace("NONE", "")
    assert "The resumed run loaded no file" in page and "Traceback" in page


def test_the_page_escapes_names_and_links_from_the_runs():
    report = hostile()
    report["runs"]["reference"]["trace"] = "javascript:alert(1)"
    report["runs"]["resumed"]["log"] = f"{ROOT}/a b#c?.txt"
    page = resume.render_html(report, Path(ROOT))
    parsed = _parse(page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\x1b" not in page and "\x07" not in page and "\\x1b[2J" in page
    assert "a%20b%23c%3F.txt" in parsed.links
    assert not any(link.startswith("javascript:") for link in parsed.links)


def test_not_reproducible_says_where_the_stopped_run_differs_and_why():
    report = equivalent()
    report.update(
        verdict="not_reproducible",
        exit_code=1,
        reason="two runs of the command differ before the checkpoint",
        aligned_step=None,
        state_at_resume=None,
        compared=None,
        control=None,
        before_resume={"step": 2, "phase": "outputs", "tensor": "output"},
        losses={"reference": [[0, 2.0], [1, 1.9]], "stopped": [[0, 2.0], [1, 1.95]]},
        html=f"{ROOT}/report.html",
    )
    lines = _terminal(report)
    assert (
        "✘ NOT REPRODUCIBLE before the checkpoint  the stopped run differs from the reference "
        "at step 2 · outputs · output"
    ) in lines
    assert "  reason      two runs of the command differ before the checkpoint" in lines
    assert lines[-1] == f"  report      {ROOT}/report.html"
    (case,) = resume.cases(report)
    assert case["kind"] == "failure" and case["failure"].startswith(
        "not reproducible before the checkpoint: the stopped run differs from the reference at "
        "step 2"
    )
    page = resume.render_html(report, Path(ROOT))
    _parse(page)
    assert (
        "Loss per reference step: reference, stopped; the dotted line marks the checkpoint" in page
    )
