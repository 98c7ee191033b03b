"""JUnit XML for CI: one test case per leg (reproducible within the leg) and one per
golden check; a failure's text is the divergence, as the terminal states it.

Names and messages are made safe first (report/safe.py): a control character, which XML 1.0
cannot hold even escaped, is written as ``\\x01``, so the file parses whatever the runs
named."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any

from .safe import clean


def _divergence_text(d: dict[str, Any]) -> str:
    text = f"diverged at step {d['step']} · {d['phase']} · {d['tensor']}"
    if d.get("max_abs_diff") is not None:
        text += f" (max |Δ| {d['max_abs_diff']:.3g}, {d['elements_differing']} elements differ)"
    if d.get("op"):
        text += f"; op {d['op']} at {d.get('source')}; cause: {d.get('cause')}"
    return text


def cases(report: dict[str, Any]) -> list[dict[str, Any]]:
    """(name, failure message or None, skipped reason or None, details) per test case."""
    out = []
    first = report.get("first_divergence")
    for leg in report["legs"]:
        name = f"reproducible[{leg['name']}]"
        if leg["status"] == "skipped":
            out.append({"name": name, "skipped": leg["reason"]})
            continue
        failed = [r for r in leg["runs"] if r["status"] not in ("complete", "stopped")]
        if failed:
            message = "; ".join(f"run #{r['run']}: {r['error'] or r['status']}" for r in failed)
            out.append({"name": name, "failure": message, "kind": "error"})
        elif leg.get("first_divergence"):
            d = first if first and first.get("leg") == leg["name"] else leg["first_divergence"]
            out.append({"name": name, "failure": _divergence_text(d), "kind": "failure"})
        else:
            out.append({"name": name})
    if report.get("canary") or report.get("observer"):  # the runs agreed: was it seen?
        case = {"name": "verified"}
        if report.get("verdict") == "not_verified":
            case.update(failure=f"not verified: {report.get('reason')}", kind="failure")
        out.append(case)
    for comparison in report.get("across_legs") or []:
        name = f"across_legs[{' vs '.join(comparison['pair'])}]"
        if comparison["within_tolerance"]:
            out.append({"name": name})
        else:
            o = comparison["first_outside"] or {}
            out.append(
                {
                    "name": name,
                    "kind": "failure",
                    "failure": f"outside {comparison['tolerance']} from step {o.get('step')} · "
                    f"{o.get('phase')} · {o.get('tensor')}",
                }
            )
    golden = report.get("golden")
    if golden:
        case = {"name": f"golden[{os.path.basename(golden['golden'])}]"}
        if not golden["matches"]:
            case["kind"] = "failure"
            if golden["first_divergence"]:
                case["failure"] = "changed against golden: " + _divergence_text(
                    golden["first_divergence"]
                )
            else:
                o = (golden["comparison"] or {}).get("first_outside") or {}
                case["failure"] = (
                    f"outside {golden['comparison']['tolerance']} against golden from "
                    f"step {o.get('step')} · {o.get('phase')} · {o.get('tensor')}"
                )
            if golden.get("note"):
                case["failure"] += f" ({golden['note']})"
        out.append(case)
    return out


def write_junit(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as a JUnit XML file (testsuites/testsuite/testcase)."""
    report = clean(report)
    seconds = (report.get("timings") or {}).get("total_s", 0)
    write_cases(cases(report), f"reprocheck.{report['config']['name']}", seconds, path)


def write_cases(
    items: list[dict[str, Any]], suite_name: str, seconds: float, path: str | os.PathLike
) -> None:
    """Test cases as a JUnit XML file: each its ``name``, its ``time`` (default 0), and a
    ``failure`` (of ``kind`` failure or error), a ``skipped`` reason, its ``out``."""
    counts = {
        "tests": str(len(items)),
        "failures": str(sum(1 for c in items if c.get("kind") == "failure")),
        "errors": str(sum(1 for c in items if c.get("kind") == "error")),
        "skipped": str(sum(1 for c in items if "skipped" in c)),
        "time": f"{float(seconds or 0):.3f}",
    }
    suites = ET.Element("testsuites", **counts)
    suite = ET.SubElement(suites, "testsuite", name=suite_name, **counts)
    for item in items:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=suite_name,
            name=item["name"],
            time=f"{float(item.get('time') or 0):.3f}" if "time" in item else "0",
        )
        if "skipped" in item:
            ET.SubElement(case, "skipped", message=str(item["skipped"]))
        elif "failure" in item:
            tag = "error" if item.get("kind") == "error" else "failure"
            element = ET.SubElement(case, tag, message=item["failure"], type=f"reprocheck.{tag}")
            element.text = item["failure"]
        if item.get("out"):
            ET.SubElement(case, "system-out").text = item["out"]
    ET.ElementTree(suites).write(os.fspath(path), encoding="utf-8", xml_declaration=True)
