"""reprocheck: audit PyTorch training for bitwise reproducibility.

Public API: :func:`fingerprint` (a tensor's exact digest), :func:`sketch` (its float64
statistics), :class:`Recorder` (fingerprint a loop of your own) and :func:`audit` (run a
training function N times and get the report); the command line is ``reprocheck``.
"""

__version__ = "0.1.0"

# Bound after the submodule is imported: `reprocheck.fingerprint` is the function, while
# `import reprocheck.fingerprint` / `from reprocheck.fingerprint import ...` still reach
# the module through sys.modules.
from .api import Recorder, audit
from .fingerprint import fingerprint, sketch

__all__ = ["Recorder", "__version__", "audit", "fingerprint", "sketch"]
