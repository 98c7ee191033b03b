"""A Jupyter notebook as the training script: ``reprocheck exec -- HW01.ipynb ARGS``.

The notebook's code cells run in order in the run's own process, in one fresh
``__main__`` namespace (as :func:`runpy.run_path` runs a script: ``__name__ ==
"__main__"``, ``sys.argv`` is ``[notebook, *ARGS]``, the notebook's folder is first on
``sys.path``, the working folder is left as it is; there is no ``__file__``, as in
Jupyter). Markdown and raw cells are skipped.

**Cells are numbered as Jupyter numbers them** after *Restart & Run All* (or
``jupyter nbconvert --execute``): cell N is the N-th code cell that holds code — the one
labelled ``In [N]``; markdown, raw and empty code cells are not counted. Cell N's code is
compiled with the filename ``/abs/path/HW01.ipynb#cellN`` (its source is registered in
:mod:`linecache` under that name), so tracebacks show the cell's lines, and reprocheck
names a line of it ``HW01.ipynb · cell N, line L`` (:func:`cell_of`,
:func:`reprocheck.child.context.display_line`).

**IPython syntax.** Where IPython is installed, each cell is first transformed by IPython's
own machinery (``InteractiveShell.transform_cell``, the shell's namespace being the
notebook's: ``!echo``, ``%time``, ``%%time`` … behave as in Jupyter); the transformed code
is then compiled and executed here, not by ``run_cell``, which would catch exceptions: an
error in a cell, a ``sys.exit``, and the clean stop of ``--steps`` (a ``SystemExit``) end
the notebook as they would end a script. A magic that runs code through ``run_cell``
(``%%capture``) has IPython's semantics for errors, except that a ``SystemExit`` still
ends the notebook. A cell's last expression is not displayed. Without IPython, a notebook
of plain Python runs; one with ``!``/``%`` lines fails before its first cell, naming the
line.
"""

from __future__ import annotations
import __future__

import ast
import hashlib
import json
import linecache
import os
import re
import sys
import types
from typing import Any

_CELL_NAME = re.compile(r"(.+\.ipynb)#cell(\d+)", re.IGNORECASE | re.DOTALL)
# the compiler flags of ``from __future__`` imports: a cell's carry on to the cells after it
_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag
# lines only IPython understands: ``!cmd``, ``%magic``, ``%%cell magic``, ``x = !cmd``,
# ``?obj``, ``obj?``
_IPYTHON_LINE = re.compile(
    r"\s*(?:[!%]|[\w.]+(?:\s*,\s*[\w.]+)*\s*=\s*[!%]|\?+[\w.]|[\w.]+\?{1,2}\s*$)"
)
# the filenames IPython's ``%time`` / ``%%time`` compile their statement or body with
_TIMED = ("<timed exec>", "<timed eval>")


class NotebookError(Exception):
    """A notebook that cannot run here (IPython syntax, and no IPython)."""


def cell_filename(path: str, number: int) -> str:
    """The filename cell ``number`` of the notebook at ``path`` is compiled with."""
    return f"{os.path.abspath(path)}#cell{number}"


def cell_of(filename: str) -> tuple[str, int] | None:
    """``/abs/HW01.ipynb#cell7`` → (``/abs/HW01.ipynb``, 7); None for any other filename."""
    if "#cell" not in filename:
        return None
    found = _CELL_NAME.fullmatch(filename)
    return (found.group(1), int(found.group(2))) if found else None


def code_cells(path: str) -> list[str]:
    """The sources of the notebook's code cells that hold code, in order (cell 1 first).
    A file that is not a notebook raises :class:`~reprocheck.script.ScriptError`."""
    from .script import ScriptError

    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as file:
            notebook = json.load(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read the notebook {name}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{name} is not a Jupyter notebook (not JSON: {exc})") from None
    cells: Any = None
    if isinstance(notebook, dict):
        cells = notebook.get("cells")
        worksheets = notebook.get("worksheets")  # nbformat 3
        if cells is None and isinstance(worksheets, list):
            cells = [c for sheet in worksheets for c in (sheet or {}).get("cells") or []]
    if not isinstance(cells, list):
        raise ScriptError(f"{name} is not a Jupyter notebook (no list of cells)")
    sources = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", cell.get("input", ""))  # nbformat 3: "input"
        if isinstance(source, list) and all(isinstance(line, str) for line in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise ScriptError(f"{name} is not a Jupyter notebook (a code cell's source)")
        if source.strip():
            sources.append(source)
    return sources


def code_sha256(path: str) -> str:
    """The notebook's identity: a sha256 of its code cells' sources only (running it,
    which rewrites outputs and execution counts, or editing markdown leaves it as it is)."""
    sources = code_cells(path)
    return hashlib.sha256(json.dumps(sources, ensure_ascii=False).encode()).hexdigest()


def run_notebook(path: str, args: list[str]) -> None:
    """Run the notebook's code cells in order, in this process (see the module's notes).
    Whatever a cell raises propagates, ``SystemExit`` included."""
    path = os.path.abspath(path)
    sources = code_cells(path)
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    names = [cell_filename(path, number) for number in range(1, len(sources) + 1)]
    for name, source in zip(names, sources):
        lines = source.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        linecache.cache[name] = (len(source), None, lines, name)
    main, argv = sys.modules.get("__main__"), sys.argv  # (IPython's shell replaces __main__)
    try:
        shell = _shell(module, dict(zip(names, sources)))
        compiled: list[types.CodeType | None] = [None] * len(sources)
        flags = 0
        if shell is None:  # plain Python: every cell compiles before the first runs
            for index, (name, source) in enumerate(zip(names, sources)):
                try:
                    compiled[index] = code = _compile(source, name, flags)
                except SyntaxError:
                    _needs_ipython(source, name)
                    raise
                flags |= code.co_flags & _FUTURE_FLAGS
        sys.modules["__main__"] = module
        sys.argv = [path, *args]
        sys.path.insert(0, os.path.dirname(path))
        for index, (name, source) in enumerate(zip(names, sources)):
            code = compiled[index]
            if code is None:  # IPython: transformed when its turn comes (as Jupyter does)
                code = _compile(_transformed(shell, source), name, flags)
                flags |= code.co_flags & _FUTURE_FLAGS
            exec(code, namespace)
    finally:
        sys.argv = argv
        if main is not None:
            sys.modules["__main__"] = main


def _transformed(shell: Any, source: str) -> str:
    """The cell as IPython runs it; IPython drops leading blank lines: they are put back,
    so the code's lines are the cell's."""
    lines = source.splitlines()
    blank = next((i for i, line in enumerate(lines) if line.strip()), 0)
    return "\n" * blank + shell.transform_cell(source)


def _compile(source: str, name: str, flags: int) -> types.CodeType:
    """A cell's code, compiled as its cell's (``flags``: the earlier cells' futures). A
    syntax error names the cell: "invalid syntax (HW01.ipynb · cell 3, line 2)"."""
    try:
        return compile(source, name, "exec", flags, True)
    except SyntaxError as exc:
        cell = cell_of(name)
        if cell is not None and exc.filename == name:
            exc.filename = f"{cell[0]} · cell {cell[1]}"  # str() shows its basename
        raise


def _needs_ipython(source: str, name: str) -> None:
    """A cell that does not compile as Python and has a line only IPython understands:
    one line that says so (no IPython here)."""
    for lineno, line in enumerate(source.splitlines(), start=1):
        if _IPYTHON_LINE.match(line):
            from .child.context import display_line

            text = line.strip()
            text = text if len(text) <= 40 else text[:39] + "…"
            raise NotebookError(
                f"{display_line(name, lineno)} uses IPython syntax ({text}): "
                "pip install ipython to run this notebook"
            ) from None


def _shell(module: types.ModuleType, cells: dict[str, str]) -> Any:
    """IPython's shell with the notebook's namespace as its user namespace (None without
    IPython): ``get_ipython()``, ``display`` and the magics work as in Jupyter."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config
    except ImportError:
        return None
    if InteractiveShell.initialized():
        shell = InteractiveShell.instance()
        shell.init_create_namespaces(module, module.__dict__)
        shell.init_user_ns()
    else:
        config = Config()
        config.HistoryManager.enabled = False  # no history database, no saving thread
        shell = InteractiveShell.instance(
            config=config, user_module=module, user_ns=module.__dict__
        )
    _cell_compiles(shell, cells)
    run_cell = shell.run_cell

    def run_cell_to_the_end(*args: Any, **kwargs: Any) -> Any:
        # a magic that runs its cell through ``run_cell`` (``%%capture``) would show a
        # SystemExit (the clean stop of ``--steps``, a ``sys.exit``) and carry on: it ends
        # the notebook instead
        result = run_cell(*args, **kwargs)
        if isinstance(getattr(result, "error_in_exec", None), SystemExit):
            raise result.error_in_exec
        return result

    shell.run_cell = run_cell_to_the_end
    return shell


def _cell_compiles(shell: Any, cells: dict[str, str]) -> None:
    """``%time STATEMENT`` and a ``%%time`` cell's body are compiled by the magic as
    ``<timed exec>``: they get their cell's filename and lines, so their frames are the
    user's (a seeding call's line, a zoomed op's line, an error's)."""
    base = type(shell.compile)

    class CellCompiler(base):  # type: ignore[misc, valid-type]
        def __call__(self, source: Any, filename: str, symbol: str, *args: Any, **kw: Any):
            if filename in _TIMED and isinstance(source, ast.AST):
                found = _running_cell(cells)
                if found is not None:
                    filename, offset = found
                    ast.increment_lineno(source, offset)
            return super().__call__(source, filename, symbol, *args, **kw)

    shell.compile.__class__ = CellCompiler


def _running_cell(cells: dict[str, str]) -> tuple[str, int] | None:
    """(the filename of the innermost notebook cell running, the line the code a magic
    compiles starts after): the magic's own line for a line magic, the ``%%`` line for
    a cell magic (its body starts on the next line)."""
    frame = sys._getframe(2)
    while frame is not None:
        source = cells.get(frame.f_code.co_filename)
        if source is not None:
            lineno = frame.f_lineno
            lines = source.splitlines()
            text = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
            cell_magic = text.lstrip().startswith("%%")
            return frame.f_code.co_filename, lineno if cell_magic else lineno - 1
        frame = frame.f_back
    return None
