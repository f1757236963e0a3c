"""Errors are a documented contract: one table (``broker.errors.ERRORS``) for every code."""

from __future__ import annotations

import importlib
import pkgutil
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

import broker
import sidecar
from broker.core.models import CredentialRequest, DenyCode, Outcome
from broker.core.scopemap import evaluate, parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import (
    ERRORS,
    FALLBACK_CODES,
    CredbrokerError,
    IdentityError,
    PolicyError,
    error_table_markdown,
    exit_code_for,
)

ROOT = Path(__file__).parents[3]
BEGIN, END = "<!-- errors:begin -->", "<!-- errors:end -->"


def _all_error_classes() -> list[type[CredbrokerError]]:
    for pkg in (broker, sidecar):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if "._proto" not in mod.name:
                importlib.import_module(mod.name)
    out: list[type[CredbrokerError]] = []
    todo: list[type[CredbrokerError]] = [CredbrokerError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def _codes_in_source() -> set[tuple[int | None, str]]:
    """(HTTP status or None, code) of every error the sidecar writes itself."""
    found: set[tuple[int | None, str]] = set()
    for path in (ROOT / "sidecar").glob("*.py"):
        text = path.read_text()
        found |= {(int(s), c) for s, c in
                  re.findall(r'_send\((\d+), _error\("(\w+)"', text)}
        found |= {(int(s), c) for s, c in
                  re.findall(r'BrokerCallError\(\s*(\d+),\s*"(\w+)"', text)}
        found |= {(None, c) for c in re.findall(r'_error\("(\w+)"', text)}
    return found


def test_every_code_an_error_or_a_denial_can_carry_is_in_the_table() -> None:
    from broker.grpc.service import ApprovalClosedError

    codes = {cls.code for cls in _all_error_classes()} | {d.value for d in DenyCode}
    codes |= {ApprovalClosedError("x", state=s).code for s in ("denied", "expired")}
    codes |= {c for _, c in _codes_in_source()} | set(FALLBACK_CODES.values())
    assert len(codes) > 30
    missing = sorted(codes - set(ERRORS))
    assert not missing, f"add these codes to broker.errors.ERRORS: {missing}"


def test_the_sidecar_answers_each_of_its_own_codes_with_the_tables_status() -> None:
    for status, code in _codes_in_source():
        if status is not None:
            assert ERRORS[code].http_status == status, code
    from sidecar.app import busy_response

    assert busy_response().startswith(f"HTTP/1.1 {ERRORS['busy'].http_status} ".encode())


def test_every_status_in_the_table_is_a_real_one() -> None:
    for code, spec in ERRORS.items():
        assert re.fullmatch(r"[a-z][a-z_]*", code), code
        if spec.grpc_status is not None:
            assert grpc.StatusCode[spec.grpc_status], code
        assert spec.http_status is None or 400 <= spec.http_status < 600, code
        assert spec.exit_code is None or 1 <= spec.exit_code <= 5, code
        assert spec.summary and "|" not in spec.summary, code
    for status, code in FALLBACK_CODES.items():
        assert grpc.StatusCode[status]
        assert ERRORS[code].grpc_status == status, code
    assert ERRORS["budget_exhausted"].http_status == 429
    assert ERRORS["break_glass_limited"].http_status == 429


def test_the_readme_error_table_is_the_modules() -> None:
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme
    shown = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert shown == error_table_markdown(), (
        "README's error table differs from broker.errors.ERRORS; regenerate it with\n"
        "  python -c 'from broker.errors import error_table_markdown as t; print(t())'")


def test_the_broker_answers_each_code_with_the_tables_grpc_status() -> None:
    from broker.grpc.service import grpc_status

    for code, spec in ERRORS.items():
        expected = grpc.StatusCode[spec.grpc_status] if spec.grpc_status \
            else grpc.StatusCode.INTERNAL
        assert grpc_status(code) is expected, code
    assert grpc_status("no-such-code") is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(("error", "exit_code"), [
    (IdentityError("x"), 3), (PolicyError("x"), 4), (CredbrokerError("x"), 1),
])
def test_the_cli_exits_by_the_code(error: CredbrokerError, exit_code: int) -> None:
    assert exit_code_for(error) == exit_code


def test_a_code_from_the_broker_decides_the_cli_exit_not_the_status() -> None:
    err = PolicyError("too many break-glass uses")  # what PERMISSION_DENIED would give
    err.code = "unknown_action_class"
    assert exit_code_for(err) == 2
    err.code = "not-in-the-table"
    assert exit_code_for(err) == 1


MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  identity.disable_account:
    risk: low
    owner: {team: iam, contact: iam@example.org}
    escalation: [iam-oncall]
    workloads: [spiffe://example.org/agent/containment]
    limits: {per_workload: 2/h}
    credential:
      ttl: 1m
      max_ttl: 2m
      vault_policy:
        - path: secret/data/soc/identity/*
          capabilities: [read]
"""


def test_a_spent_budget_says_when_it_frees_up() -> None:
    m = parse_scope_map([("m.yaml", MAP)])
    sid = SpiffeId.parse("spiffe://example.org/agent/containment")
    req = CredentialRequest(action_class="identity.disable_account")
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    recent = [now - timedelta(minutes=50), now - timedelta(minutes=10), now - timedelta(hours=2)]
    d = evaluate(m, sid, req, now, recent)
    assert d.outcome is Outcome.DENY and d.deny_code is DenyCode.BUDGET_EXHAUSTED
    assert d.retry_after_seconds == 600  # the one issued 50 minutes ago leaves in 10
    three = [now - timedelta(minutes=m) for m in (59, 30, 5)]  # a map shrunk to 2/h
    assert evaluate(m, sid, req, now, three).retry_after_seconds == 30 * 60
    ok = evaluate(m, sid, req, now, recent[:1])
    assert ok.outcome is Outcome.ALLOW and ok.retry_after_seconds == 0


def test_a_429_the_broker_gave_no_time_for_carries_the_default_retry_after(
        tmp_path: Path) -> None:
    """Through the real sidecar HTTP server, with a stand-in for the broker client."""
    import http.client
    import socket
    from typing import Any, cast

    from broker.errors import DEFAULT_RETRY_AFTER_SECONDS
    from sidecar.app import SidecarHttpServer, SidecarService
    from sidecar.broker_client import BrokerCallError, http_status

    class Spent:
        async def issue(self, msg: object, wait: int = 0) -> tuple[int, dict[str, Any]]:
            raise BrokerCallError(http_status("budget_exhausted"), "budget_exhausted",
                                  "budget spent")

    server = SidecarHttpServer(tmp_path / "s.sock", cast(SidecarService, Spent()))
    server.serve_in_thread()
    try:
        conn = http.client.HTTPConnection("sidecar", timeout=10)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(tmp_path / "s.sock"))
        conn.request("POST", "/v1/credentials", body=b'{"action_class": "enrichment"}')
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    finally:
        server.close()
    assert resp.status == 429
    assert resp.getheader("Retry-After") == str(DEFAULT_RETRY_AFTER_SECONDS)
    assert b'"retry_after_seconds": 30' in body
