"""The Vault adapter against a real HTTP peer that answers badly: every way the answer can
be lost or unreadable is VaultUnavailableError (the mint's outcome is then unknown and
kept as ambiguous), never a stray exception that kills a loop or becomes a 500."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from broker.adapters.vault import VaultAdapter
from broker.core.scopemap import parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import VaultPermissionError, VaultUnavailableError

MAP = """apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc, contact: soc@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/agent/triage]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/*
          capabilities: [read]
"""


def _serve(answer: bytes) -> Iterator[str]:
    """A one-thread HTTP peer that reads a request and sends ``answer`` then closes."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=run, daemon=True).start()
    yield f"http://127.0.0.1:{lst.getsockname()[1]}"
    stop.set()
    lst.close()


CUT_MID_BODY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n40\r\n{\"auth\": {\"client_token\": \"s.x")
NOT_JSON = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 20\r\n"
            b"Connection: close\r\n\r\n<html>proxy!</html>\n")
WRONG_JSON = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
              b"Connection: close\r\n\r\n{\"auth\": 42}\n")
SHORT_BODY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
              b"Connection: close\r\n\r\n{\"auth\": {")


@pytest.mark.parametrize("answer", [CUT_MID_BODY, NOT_JSON, WRONG_JSON, SHORT_BODY],
                         ids=["cut-mid-body", "not-json", "wrong-json", "short-body"])
def test_a_lost_or_unreadable_answer_is_vault_unavailable(answer: bytes) -> None:
    cls = parse_scope_map([("map.yaml", MAP)]).classes["enrichment"]
    for addr in _serve(answer):
        vault = VaultAdapter(addr=addr, token="t", timeout=2)
        with pytest.raises(VaultUnavailableError):
            vault.mint(cls=cls, spiffe_id=SpiffeId.parse("spiffe://example.org/agent/triage"),
                       ttl_seconds=60,
                       metadata={}, now=datetime.now(UTC))
        with pytest.raises(VaultUnavailableError):
            vault.lookup_accessor("acc")
        with pytest.raises(VaultUnavailableError):
            vault.list_accessors()


def test_a_403_is_never_read_as_gone_while_the_broker_token_is_refused() -> None:
    forbidden = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 33\r\nConnection: close\r\n\r\n"
                 b"{\"errors\": [\"permission denied\"]}")
    for addr in _serve(forbidden):
        vault = VaultAdapter(addr=addr, token="t", timeout=2)
        vault._capabilities_ok = True  # it was fine a moment ago: must be asked again
        with pytest.raises(VaultPermissionError):
            vault.lookup_accessor("acc")
        with pytest.raises(VaultPermissionError):
            vault.revoke_accessor("acc", check=False)
