"""Dev tooling: the dev Workload API, dev stack, demo, dev identity provider and dev
certificates. Never imported by the production broker (``credbroker serve``)."""
