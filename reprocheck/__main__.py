"""``python -m reprocheck``: the same as the ``reprocheck`` command."""

from .cli import main

main()
