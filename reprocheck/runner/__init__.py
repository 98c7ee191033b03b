"""Runs: scheduling (launch), one run per process (worker), the training recipe (loop)."""
