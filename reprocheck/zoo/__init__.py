"""Built-in models, synthetic data and planted-nondeterminism fixtures for audits and tests."""
