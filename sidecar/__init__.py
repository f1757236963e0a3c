"""credbroker sidecar: the agent-facing HTTP/JSON API on a unix socket, and its Python client."""
