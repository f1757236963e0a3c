"""A mint whose answer is lost: the agent hears an error, and no token outlives the reconcile.

OpenBao sits one TCP hop away behind the fault proxy. Each test loses one mint's answer
in a different way, then checks from outside (OpenBao's accessors with a root token,
the registry file, the audit log file) that every live credbroker token is known to
the registry and named in the audit log, and that the lost one was revoked by the
reconcile loop and recorded as such.
"""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import grpc
import pytest

import broker.app.responder
from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.grpc.server import BrokerServer
from tests.faults.conftest import Factory
from tests.faults.support import (
    BrokerFiles,
    VaultView,
    audit_records,
    error_code,
    registry_rows,
    settle,
    until,
)
from tests.integration.conftest import TRIAGE, Identity
from tests.integration.helpers import TcpProxy, issue_request, stub, svid

MINT = b"/auth/token/create/"


def _issue(server: BrokerServer, identity: Identity, request_id: str,
           timeout: float = 30) -> pb.IssueCredentialResponse:
    return stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
        issue_request(request_id=request_id), timeout=timeout)


def _issue_expecting_failure(server: BrokerServer, identity: Identity, request_id: str,
                             timeout: float = 30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _issue(server, identity, request_id, timeout)
    return err.value


def _row(server: BrokerServer, request_id: str) -> dict[str, object] | None:
    assert server.store is not None
    rows = [r for r in registry_rows(server.store.path) if r["request_id"] == request_id]
    return rows[0] if rows else None


def _assert_agent_told_unavailable(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert error_code(err) == "vault_unavailable"


def _assert_reconciled(server: BrokerServer, view: VaultView, request_id: str) -> str:
    """The lost mint's token: found by the reconcile loop, revoked, recorded, audited."""
    until(lambda: (_row(server, request_id) or {}).get("revoke_selector") == "reconcile",
          "the reconcile loop to revoke and record the lost mint's token")
    row = _row(server, request_id)
    assert row is not None
    accessor = str(row["credential_id"])
    assert accessor, "the registry row does not name the token Vault minted"
    assert row["state"] == "revoked" and row["revoke_pending"] == 0, row["state"]
    assert not view.alive(accessor), "the lost mint's token is still live in OpenBao"
    assert server.config.audit_path is not None
    until(lambda: any(r["type"] == "credential.revoked" and r.get("credential_id") == accessor
                      and r.get("selector") == "reconcile"
                      for r in audit_records(server.config.audit_path)),
          "the reconcile credential.revoked audit record")
    minted = [r for r in audit_records(server.config.audit_path)
              if r["type"] == "credential.minted" and r.get("credential_id") == accessor]
    assert minted == [], "a credential.minted record for a token nobody received"
    return accessor


def test_connection_cut_after_the_mint_reached_openbao(
    make_broker: Factory, proxy: TcpProxy, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles]
) -> None:
    server = make_broker(vault_addr=proxy.addr)
    assert server.store is not None
    handed = [_issue(server, identity, uuid.uuid4().hex).credential.credential_id]
    before = set(view.live_credbroker())
    proxy.hold()  # Vault mints; its answer waits in the proxy
    rid = "cut-" + uuid.uuid4().hex
    failure: list[grpc.RpcError] = []
    caller = threading.Thread(
        target=lambda: failure.append(_issue_expecting_failure(server, identity, rid)))
    caller.start()
    until(lambda: any(m.get("request_id") == rid
                      for a, m in view.live_credbroker().items() if a not in before),
          "OpenBao to mint the held request")
    proxy.cut()  # ... and the connection dies before the answer is relayed
    caller.join(30)
    (err,) = failure
    _assert_agent_told_unavailable(err)
    proxy.restore()
    proxy.release()
    accessor = _assert_reconciled(server, view, rid)
    assert accessor not in handed
    v = settle(view, tracked, handed)
    assert v.ok, str(v)


def test_502_after_the_mint_reached_openbao(
    make_broker: Factory, proxy: TcpProxy, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles]
) -> None:
    server = make_broker(vault_addr=proxy.addr)
    handed = [_issue(server, identity, uuid.uuid4().hex).credential.credential_id]
    proxy.fail_answers(MINT)  # OpenBao mints; the broker hears "502 Bad Gateway"
    rid = "502-" + uuid.uuid4().hex
    err = _issue_expecting_failure(server, identity, rid)
    proxy.stop_failing()
    _assert_agent_told_unavailable(err)
    assert proxy.failed == 1
    _assert_reconciled(server, view, rid)
    v = settle(view, tracked, handed)
    assert v.ok, str(v)


def test_timeout_after_the_mint_reached_openbao(
    make_broker: Factory, proxy: TcpProxy, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles]
) -> None:
    """Vault minted, its answer never came: the broker's own request timeout (5 s, not
    configurable) ends the wait."""
    server = make_broker(vault_addr=proxy.addr)
    proxy.hold()
    rid = "timeout-" + uuid.uuid4().hex
    err = _issue_expecting_failure(server, identity, rid)
    _assert_agent_told_unavailable(err)
    assert "Timeout" in err.details()
    proxy.release()
    _assert_reconciled(server, view, rid)
    v = settle(view, tracked)
    assert v.ok, str(v)


def test_black_hole_during_a_mint(
    make_broker: Factory, proxy: TcpProxy, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request never reaches Vault and nothing answers: the broker times out (5 s),
    keeps the intent as ambiguous, and drops it once a scan shows Vault holds no token."""
    server = make_broker(vault_addr=proxy.addr)
    before = set(view.live_credbroker())
    proxy.blackhole()
    rid = "hole-" + uuid.uuid4().hex
    err = _issue_expecting_failure(server, identity, rid)
    _assert_agent_told_unavailable(err)
    assert proxy.swallowed >= 1
    row = _row(server, rid)
    assert row is not None and row["state"] == "ambiguous" and row["credential_id"] is None
    proxy.unblackhole()
    assert not {m.get("request_id") for a, m in view.live_credbroker().items()
                if a not in before} & {rid}
    # Intents are dropped once older than STALE_INTENT (30 s); shortened here.
    monkeypatch.setattr(broker.app.responder, "STALE_INTENT", timedelta(seconds=1))
    assert server.responder is not None
    server.responder.reconcile_soon()
    until(lambda: _row(server, rid) is None, "the ambiguous intent without a token to be "
          "dropped")
    v = settle(view, tracked)
    assert v.ok, str(v)


def test_slow_vault_within_the_timeout_still_issues(
    make_broker: Factory, proxy: TcpProxy, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles]
) -> None:
    server = make_broker(vault_addr=proxy.addr)
    proxy.slow(0.3)  # every chunk, both ways
    cred = _issue(server, identity, uuid.uuid4().hex).credential
    proxy.slow(0)
    assert cred.credential_id and view.alive(cred.credential_id)
    v = settle(view, tracked, [cred.credential_id])
    assert v.ok, str(v)
