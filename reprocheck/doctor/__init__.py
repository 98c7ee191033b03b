"""The doctor: rule catalog (rules), checks and probes (probe), attribution by experiment (attribute)."""
