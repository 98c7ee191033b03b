"""Commands beyond ``run`` and ``compare``, one module per feature.

Each module defines ``register(app: typer.Typer) -> None`` that adds its commands;
:mod:`reprocheck.cli` lists every command in one place (``_add_commands``), calling each
module's ``register``. Shared pieces (consoles, ``user_errors``, ``fail``, ``UsageError``,
the options every audit command declares) come from :mod:`reprocheck.cli`; what the
options become, from :mod:`reprocheck.options`.
"""
