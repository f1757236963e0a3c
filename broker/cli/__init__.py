"""The ``credbroker`` command line: one module per command family."""
