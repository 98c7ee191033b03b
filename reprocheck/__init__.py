"""reprocheck: audit PyTorch training for bitwise reproducibility.

Public API: :func:`fingerprint` (a tensor's exact digest) and :func:`sketch` (its float64
statistics); the command line is ``reprocheck`` (see ``reprocheck --help``).
"""

__version__ = "0.1.0"

# Bound after the submodule is imported: `reprocheck.fingerprint` is the function, while
# `import reprocheck.fingerprint` / `from reprocheck.fingerprint import ...` still reach
# the module through sys.modules.
from .fingerprint import fingerprint, sketch

__all__ = ["__version__", "fingerprint", "sketch"]
