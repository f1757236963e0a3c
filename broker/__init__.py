"""credbroker: a workload-identity credential broker for autonomous SOC agents."""

__version__ = "0.1.0"
