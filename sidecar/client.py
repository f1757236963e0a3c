"""A small Python client for agents: talk to the sidecar's unix socket.

    from sidecar.client import SidecarClient
    c = SidecarClient.from_env()  # $CREDBROKER_SIDECAR_SOCKET, e.g. /run/credbroker/sidecar.sock
    cred = c.request_credential("enrichment", initiating_event={"source": "splunk", "id": "N-1"})
    ... use cred["token"] with Vault ...
    c.hand_back(cred["credential_id"])
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from typing import Any


class SidecarError(Exception):
    """The sidecar answered with an error. ``status``/``code``/``body`` say which."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


#: The agent container's environment variable naming the sidecar's socket (the same name
#: the sidecar takes its ``--listen`` socket from).
SOCKET_ENV = "CREDBROKER_SIDECAR_SOCKET"


class SidecarClient:
    def __init__(self, socket_path: str, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 timeout: float = 30.0) -> SidecarClient:
        """The client for the socket ``$CREDBROKER_SIDECAR_SOCKET`` names (``env``: the
        process environment when not given). Raises: ValueError when it is not set."""
        path = (os.environ if env is None else env).get(SOCKET_ENV, "")
        if not path:
            raise ValueError(f"{SOCKET_ENV} is not set: set it to the sidecar's socket, e.g. "
                             "/run/credbroker/sidecar.sock")
        return cls(path.removeprefix("unix:"), timeout=timeout)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) \
            -> tuple[int, dict[str, Any]]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"{}")
            return resp.status, payload
        finally:
            conn.close()

    def _ok(self, status: int, payload: dict[str, Any]) -> dict[str, Any]:
        if status >= 400:
            err = payload.get("error") or {}
            raise SidecarError(status, str(err.get("code", "")), str(err.get("message", "")),
                               payload)
        return payload

    def request_credential(self, action_class: str, *, target: str | None = None,
                           initiating_event: dict[str, str] | None = None,
                           justification: str | None = None,
                           ttl_seconds: int | None = None,
                           environment: str | None = None) -> dict[str, Any]:
        """POST /v1/credentials. Raises: SidecarError (any non-2xx), OSError (no sidecar)."""
        body: dict[str, Any] = {"action_class": action_class}
        for k, v in (("target", target), ("initiating_event", initiating_event),
                     ("justification", justification), ("ttl_seconds", ttl_seconds),
                     ("environment", environment)):
            if v is not None:
                body[k] = v
        return self._ok(*self._call("POST", "/v1/credentials", body))

    def hand_back(self, credential_id: str) -> dict[str, Any]:
        """DELETE /v1/credentials/{id}. Raises: SidecarError, OSError."""
        return self._ok(*self._call("DELETE", f"/v1/credentials/{credential_id}"))

    def health(self) -> dict[str, Any]:
        """GET /healthz. Raises: SidecarError, OSError."""
        return self._ok(*self._call("GET", "/healthz"))

    def raw(self, method: str, path: str, body: dict[str, Any] | None = None) \
            -> tuple[int, dict[str, Any]]:
        """Any call, without raising on error statuses (for tests and tooling)."""
        return self._call(method, path, body)
