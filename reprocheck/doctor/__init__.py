"""The doctor: the rule catalog (rules), checks and probes (probe), and attribution by
experiment (attribute)."""
