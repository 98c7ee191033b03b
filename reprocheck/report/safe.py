"""Strings from outside (traces, scripts, their logs) made safe to show: control characters
escaped, long strings cut with their length said.

A tensor, module or process name, an error line or a log line comes from user code or from
a trace file that anyone may have written. Shown raw, ``\\x1b[2J`` clears the user's screen,
``\\x1b]0;…\\x07`` sets the window's title, a lone surrogate stops the printing, and a 64 MiB
name is echoed in full. Here:

- :func:`safe` is one string for a screen or a one-line field (terminal, GitHub annotations,
  JUnit XML): every control character (C0 with newline and tab, DEL, C1, and with them
  every escape sequence, which starts with ESC or a C1 character), lone surrogates, the
  line and paragraph separators, the bidirectional overrides and the noncharacters
  U+FFFE/U+FFFF are shown escaped (``\\x1b``, ``\\n``, ``\\u202e``): what is left is printable
  and valid XML 1.0. Longer than ``limit`` characters: the first ``limit`` and
  ``… (67,108,864 characters)``.
- :func:`clean` is :func:`safe` over every string (and key) of a report's dicts and lists;
  ``newlines=True`` keeps newline and tab (an HTML page shows them as spaces).
- :func:`cut` and :func:`cut_all` only cut: the JSON report stays faithful (JSON escapes
  control characters itself), a string longer than ``limit`` is its head and the same
  ``… (N characters)``, at most ``limit`` characters in all (cutting twice changes nothing).

A string cut before and cut again (report.json's 4,096 characters, then a terminal's 1,000)
still says the length it was first cut from.
"""

from __future__ import annotations

import re
from typing import Any

TEXT_LIMIT = 1000
"""A string shown on a screen or in one field of a CI file (a torch error with its advice
and its ``(file:line in function)`` fits)."""

DATA_LIMIT = 4096
"""A string kept in report.json or shown in report.html (any real path fits: PATH_MAX)."""

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufffe\uffff]"
)
_UNSAFE_BUT_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufffe\uffff]"
)
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_WAS_CUT = re.compile(r"… \(([0-9,]+) characters\)\Z")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _length(text: str) -> str:
    """``… (N characters)``: N the length of ``text``, or of the string it was cut from."""
    was = _WAS_CUT.search(text)
    count = int(was.group(1).replace(",", "")) if was else 0
    return f"… ({max(count, len(text)):,} characters)"


def safe(value: Any, limit: int = TEXT_LIMIT, newlines: bool = False) -> str:
    """``value`` as text that only shows (see the module): escaped, and cut past ``limit``
    characters with its length said."""
    text = value if isinstance(value, str) else str(value)
    suffix = ""
    if len(text) > limit:
        text, suffix = text[:limit], _length(text)
    pattern = _UNSAFE_BUT_LINES if newlines else _UNSAFE
    return pattern.sub(_escape, text) + suffix


def clean(obj: Any, limit: int = TEXT_LIMIT, newlines: bool = False) -> Any:
    """A copy of ``obj`` with :func:`safe` applied to every string in it, dict keys
    included; numbers, booleans and None are kept as they are."""
    if isinstance(obj, str):
        return safe(obj, limit, newlines)
    if isinstance(obj, dict):
        return {
            (safe(key, limit, newlines) if isinstance(key, str) else key): clean(
                value, limit, newlines
            )
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [clean(item, limit, newlines) for item in obj]
    if isinstance(obj, tuple):
        return tuple(clean(item, limit, newlines) for item in obj)
    return obj


def cut(text: str, limit: int = DATA_LIMIT) -> str:
    """``text``, or past ``limit`` characters its head and ``… (N characters)``: at most
    ``limit`` characters, so a string cut once is left as it is."""
    if len(text) <= limit:
        return text
    suffix = _length(text)
    return text[: max(0, limit - len(suffix))] + suffix


def cut_all(obj: Any, limit: int = DATA_LIMIT) -> Any:
    """A copy of ``obj`` with :func:`cut` applied to every string in it, dict keys included."""
    if isinstance(obj, str):
        return cut(obj, limit)
    if isinstance(obj, dict):
        return {
            (cut(key, limit) if isinstance(key, str) else key): cut_all(value, limit)
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [cut_all(item, limit) for item in obj]
    if isinstance(obj, tuple):
        return tuple(cut_all(item, limit) for item in obj)
    return obj
