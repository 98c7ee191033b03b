"""Each run's processes: the worker that reads a :class:`~reprocheck.contract.RunSpec`, the
run context (trace, controls, capture window), the config's training loop, the hooks that
record an unchanged script and its own child processes, and the zygote that forks runs.
It never imports :mod:`reprocheck.parent`."""
