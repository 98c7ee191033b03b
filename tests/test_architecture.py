"""The architecture holds: one direction between the parent's stages, renderers that only
render, and docs/architecture.md's module table generated from the code.

    python -m tests.test_architecture   # prints the generated table for the doc
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli

PACKAGE = ROOT / "reprocheck"
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- modules: begin -->", "<!-- modules: end -->"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Each module of the package → the package modules it imports (at any depth of the
    file: imports inside functions count, they are still dependencies)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("reprocheck"):
                    continue
                for alias in node.names:  # `from . import jsonout` names a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _exists(candidate) else target)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("reprocheck")}
        graph[name] = {module for module in found if module != name}
    return graph


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "reprocheck"


def _edges() -> set[tuple[str, str]]:
    return {
        (_area(a), _area(b))
        for a, targets in package_imports().items()
        for b in targets
        if _area(a) != _area(b)
    }


def test_parent_and_child_never_import_each_other():
    # the audit's process (parent/) and each run's processes (child/) share only what
    # both import: the contract of the boundary (reprocheck/contract.py) and the
    # top-level modules (trace, fingerprint, config …)
    edges = _edges()
    assert ("parent", "child") not in edges and ("child", "parent") not in edges
    for module, targets in package_imports().items():
        if _area(module) == "contract":
            assert {_area(t) for t in targets} <= {"contract"}, f"the contract imports {targets}"


def test_the_doctor_and_the_report_import_in_one_direction():
    edges = _edges()
    areas = {"parent", "child", "doctor", "report"}
    among = {(a, b) for a, b in edges if a in areas and b in areas}
    assert among == {("parent", "doctor")}, among  # the parent hands the doctor its auditor


def test_renderers_read_no_traces_and_no_runs():
    allowed = {"reprocheck", "reprocheck.jsonout"}
    for module, targets in package_imports().items():
        if _area(module) != "report":
            continue
        outside = {t for t in targets if _area(t) != "report" and t not in allowed}
        assert not outside, f"{module} imports {sorted(outside)}"
        path = ROOT.joinpath(*module.split("."))
        source = (
            path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
        ).read_text()
        assert "sqlite3" not in source, f"{module} opens a trace"


def module_table() -> str:
    """One row per module: its name and its docstring's first sentence."""
    rows = ["| module | what it is |", "|---|---|"]
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        rows.append(f"| `{path.relative_to(ROOT)}` | {first} |")
    return "\n".join(rows)


def test_the_module_table_in_docs_is_generated():
    text = DOC.read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert table == module_table(), "regenerate it: python -m tests.test_architecture"


def test_help_text_wraps_paragraphs_at_the_terminal_width():
    result = run_cli("exec", "--help", env={"COLUMNS": "240", "TERM": "dumb"}, fresh=True)
    assert result.code == 0
    text = " ".join(result.stdout.split())  # the box drawing of the options aside
    assert "report where the runs first differ." in text
    sentence = "Each run starts in a fresh process with the determinism preset applied before"
    line = next(line for line in result.stdout.splitlines() if "Each run starts" in line)
    assert sentence in line  # one line at 240 columns: no break mid-sentence


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["exec", "--help"],
        ["run", "--bogus"],
        ["exec", "--", "no-such-launcher", "train.sh"],
        ["doctor", "--", "python", "missing.py"],
        ["record", "-o", "g.sqlite"],
        ["check", "--against", "g.sqlite", "--format", "x", "--", "python", "a.py"],
    ],
)
def test_help_and_usage_errors_answer_without_importing_torch(argv, tmp_path):
    imported, code = _cli_in_a_fresh_interpreter(argv, tmp_path)
    assert (imported, code) == ("False", "0" if "--help" in argv else "2")


def _cli_in_a_fresh_interpreter(argv: list[str], folder: Path) -> tuple[str, str]:
    """Run the CLI in a fresh interpreter: (was torch imported in it?, its exit code)."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['reprocheck', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('reprocheck', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('torch' in sys.modules, code, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=folder, env=env
    )
    imported, code = proc.stderr.strip().splitlines()[-1].split()
    return imported, code


def _audit_without_torch(argv: list[str], folder: Path) -> tuple[str, str, dict]:
    """An audit in a fresh interpreter: (torch imported in it?, exit code, its report)."""
    options = ["--quiet", "--out", "out", "--json", "r.json"]
    imported, code = _cli_in_a_fresh_interpreter([argv[0], *options, *argv[1:]], folder)
    report = json.loads((folder / "r.json").read_text()) if (folder / "r.json").exists() else {}
    return imported, code, report


@pytest.mark.parametrize(
    "argv",
    [
        ["run", str(ROOT / "configs" / "demo.yaml"), "--steps", "2"],
        ["exec", "-n", "2", "--", "python", str(ROOT / "tests" / "scripts" / "thread_count.py")],
    ],
    ids=["run", "exec"],
)
def test_a_reproducible_audits_own_process_never_imports_torch(argv, tmp_path):
    # its runs import torch in their own processes; the audit's process starts them at
    # once and reads their traces (a verdict reads digests, no tensor): ~1 s sooner
    imported, code, report = _audit_without_torch(argv, tmp_path)
    assert (imported, code, report["verdict"]) == ("False", "0", "reproducible")


def test_a_divergence_is_measured_and_zoomed_without_torch_in_the_audits_process(tmp_path):
    # the replays' kept tensors and ops are measured in a fork of the warm zygote (a script
    # re-seeded from entropy: its replays differ in every element, as its runs do)
    script = str(ROOT / "tests" / "scripts" / "reseed_dropout.py")
    argv = ["exec", "--no-attribute", "--", "python", script]
    imported, code, report = _audit_without_torch(argv, tmp_path)
    assert (imported, code) == ("False", "1"), report.get("first_divergence")
    first = report["first_divergence"]
    assert (first["step"], first["phase"], first["tensor"]) == (1, "outputs", "output")
    assert first["elements_differing"] == 48 and first["max_abs_diff"] > 0
    assert (first["op"], first["module"], first["cause"]) == (
        "aten.bernoulli_",
        "Dropout",
        "unseeded or re-seeded RNG",
    )
    assert first["source"].endswith("reseed_dropout.py:33")


if __name__ == "__main__":
    sys.stdout.write(module_table() + "\n")


# the modules that own a format: the contract (the run spec, the child settings, the trace
# meta, typed) and the trace file's reader (which validates the meta it reads)
_KEY_OWNERS = {"reprocheck.contract", "reprocheck.trace"}
_KEYED = {"meta", "spec", "settings", "capture"}


def _keyed_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """``x.meta["k"]``, ``meta.get("k")``, ``spec["k"]`` …: a spec or meta read by string."""

    def keyed(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name) and node.id in _KEYED:
            return node.id
        if (
            isinstance(node, ast.Attribute)
            and node.attr in _KEYED
            and not (isinstance(node.value, ast.Name) and node.value.id == "ctx")  # click's
        ):
            return node.attr
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and keyed(node.value):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.append((node.lineno, f"{keyed(node.value)}[{key.value!r}]"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and keyed(node.func.value)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, f"{keyed(node.func.value)}.get({node.args[0].value!r})"))
    return found


def test_only_the_contract_reads_a_spec_or_meta_key_by_string():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module in _KEY_OWNERS:
            continue
        for line, read in _keyed_reads(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(ROOT)}:{line} {read}")
    assert not offenders, "read through reprocheck.contract's types:\n" + "\n".join(offenders)


def test_the_key_check_sees_a_keyed_read():
    # the check above cannot pass for want of looking
    tree = ast.parse("a = trace.meta['status']\nb = spec.get('trace')\nc = ctx.meta.get('x')")
    assert _keyed_reads(tree) == [(1, "meta['status']"), (2, "spec.get('trace')")]
