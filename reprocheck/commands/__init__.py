"""Commands beyond ``run`` and ``compare``, one module per feature.

Each module defines ``register(app: typer.Typer) -> None`` that adds its commands; the CLI
calls every module's ``register`` at import. Shared pieces (consoles, ``user_errors``,
``fail``, ``UsageError``) come from :mod:`reprocheck.cli`.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    """Add the commands of every module in this package, in name order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
