"""User code named in a config or a command: ``package.module:function`` or
``path/to/file.py:function``, imported (a file relative to the config's folder)."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
from typing import Callable

from .config import ConfigError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_SPEC = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")


def split_factory(spec: str) -> tuple[str, str]:
    """``pkg.mod:fn`` or ``path/to/file.py:fn`` → (target, fn); raises ValueError if malformed."""
    target, sep, function = spec.rpartition(":")
    if not sep or not target or not re.fullmatch(_IDENT, function):
        raise ValueError(f"{spec!r} is not `module:function` or `file.py:function`")
    if not target.endswith(".py") and not _MODULE_SPEC.fullmatch(spec):
        raise ValueError(f"{spec!r} is not `module:function` or `file.py:function`")
    return target, function


def resolve_callable(spec: str, base_dir: str = ".") -> Callable:
    """Import ``module:function`` or load ``file.py:function`` (relative to ``base_dir``)."""
    try:
        target, function = split_factory(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if target.endswith(".py"):
        file = target if os.path.isabs(target) else os.path.join(base_dir, target)
        if not os.path.isfile(file):
            raise ConfigError(f"{spec}: file {file} not found")
        name = "reprocheck_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(file))[0])
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != file:
            module_spec = importlib.util.spec_from_file_location(name, file)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError(f"{spec}: cannot load {file}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            folder = os.path.dirname(os.path.abspath(file))
            if folder not in sys.path:
                sys.path.insert(0, folder)  # the user's file may import its neighbours
            module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{spec}: cannot import module {exc.name!r}") from None
    found = getattr(module, function, None)
    if found is None or not callable(found):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f"{spec}: {target} has no function {function!r}{_closest(function, names)}"
        )
    return found


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" — did you mean {close[0]!r}?" if close else ""
