"""The audit's own process: plan the legs, schedule the runs (fresh or forked from a warm
zygote), find the first divergence, replay and measure it, compare the legs, and build the
report values. It never imports :mod:`reprocheck.child`; what it hands a run is a
:class:`~reprocheck.contract.RunSpec`, what it reads back is the run's trace."""
