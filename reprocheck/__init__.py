"""reprocheck: audit PyTorch training for bitwise reproducibility."""

__version__ = "0.1.0"
