"""Several brokers on one PostgreSQL store and one OpenBao, as replicas run.

Budgets are one budget for all of them (and survive restarts); a freeze made through one
is in force for issuance on the others within a second and is kept by every start-up
Vault sync; a revocation or freeze through one reaches the sidecars watching another
within a second; an approval granted through one releases the sidecar waiting on another,
and is used once across them; one replica leads the background work (one escalation
webhook, not one per replica) and another takes over when its session dies or it stops;
a stopped PostgreSQL makes them fail closed and they recover when it returns.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import hvac
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.approvers import ApproverConfig, DevIssuer
from broker.adapters.audit_pg import chain_origin, read_db_records
from broker.app.replicas import LEADER_LOCK
from broker.cli.main import main
from broker.grpc.server import BrokerServer
from broker.wire.metadata import ERROR_CODE_MD_KEY
from credbroker_dev.devpg import PgServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    TRIAGE,
    Identity,
    broker_config,
    start_sidecar,
    vault_as,
)
from tests.integration.helpers import (
    EVENT,
    admin_stub,
    approvals_stub,
    issue_request,
    stub,
    svid,
)

Factory = Callable[..., BrokerServer]


@pytest.fixture
def replicas(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
             postgres: PgServer) -> Iterator[Factory]:
    """Starts brokers on one fresh PostgreSQL database (or the ``store_url`` given)."""
    url = postgres.new_database()
    started: list[BrokerServer] = []

    def make(**overrides: object) -> BrokerServer:
        overrides.setdefault("store_url", url)
        server = BrokerServer(broker_config(bao, identity, **overrides))
        server.start()
        started.append(server)
        return server

    yield make
    for s in started:
        if not s.stopped.is_set():
            s.stop(grace=0)


def _code(err: grpc.RpcError) -> object:
    return dict(err.trailing_metadata() or ()).get(ERROR_CODE_MD_KEY)  # type: ignore[attr-defined]


def _mint(server: BrokerServer, identity: Identity, who: str = TRIAGE,
          cls: str = "enrichment", **kw: object) -> pb.IssueCredentialResponse:
    return stub(server.port, identity.ca, svid(identity.ca, who)).IssueCredential(
        issue_request(cls, initiating_event=EVENT, **kw), timeout=15)


def _health(port: int) -> int:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="credbroker.v1.CredentialBroker"),
            timeout=10).status)
    finally:
        channel.close()


def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.05)
    return time.monotonic() - started


def test_one_budget_for_all_replicas_under_concurrency_and_across_restarts(
        replicas: Factory, identity: Identity) -> None:
    """identity.disable_account allows 2/h per workload: 12 concurrent requests spread over
    two brokers get exactly 2 credentials; a broker started afterwards still says no."""
    a, b = replicas(), replicas()
    granted: list[str] = []
    refused: list[object] = []
    other: list[BaseException] = []
    go = threading.Barrier(12)

    def ask(server: BrokerServer, n: int) -> None:
        go.wait()
        try:
            resp = _mint(server, identity, CONTAINMENT, "identity.disable_account",
                         target=f"user-{n}", justification="disable the compromised account")
            granted.append(resp.credential.credential_id)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused.append(_code(exc))
            else:
                other.append(exc)

    threads = [threading.Thread(target=ask, args=((a, b)[n % 2], n)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert other == []
    assert len(granted) == 2 and len(refused) == 10
    assert set(refused) == {"budget_exhausted"}
    a.stop(grace=0)
    b.stop(grace=0)
    c = replicas()  # a restart (or a new replica) does not reset the budget
    with pytest.raises(grpc.RpcError) as err:
        _mint(c, identity, CONTAINMENT, "identity.disable_account", target="user-99",
              justification="disable the compromised account")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_freeze_through_one_replica_holds_on_the_others_within_a_second(
        replicas: Factory, identity: Identity, vault_root: hvac.Client) -> None:
    a, b = replicas(), replicas()
    _mint(b, identity)  # issuance works on both before
    admin_stub(a.port, identity.ca, svid(identity.ca, ADMIN)).Freeze(
        pb.FreezeRequest(action_class="enrichment", reason="bad TI feed"), timeout=30)
    try:

        def refused_on_b() -> bool:
            try:
                _mint(b, identity)
                return False
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                return True

        # (how fast: bench/bench_replicas.py measures the propagation; tests are not timed)
        _until(refused_on_b, "broker b still issues a class frozen through broker a", 10)
        # A new replica's start-up sync keeps the class frozen in Vault (it reads the store).
        c = replicas()
        assert c.responder is not None and c.responder.frozen_classes() == {"enrichment"}
        rules = vault_root.sys.read_policy("credbroker-enrichment")["data"]["rules"]
        assert "credbroker-frozen" in rules
        with pytest.raises(grpc.RpcError) as err:
            _mint(c, identity)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:  # unfrozen through another replica than the one that froze it
        admin_stub(b.port, identity.ca, svid(identity.ca, ADMIN)).Unfreeze(
            pb.UnfreezeRequest(action_class="enrichment", reason="feed fixed"), timeout=30)

    def issues_on_a() -> bool:
        try:
            return bool(_mint(a, identity).credential.token)
        except grpc.RpcError:
            return False

    _until(issues_on_a, "broker a still refuses after the unfreeze through b", 10)


def test_postgres_stopped_fails_closed_and_recovers_without_a_restart(
        replicas: Factory, identity: Identity, tmp_path: Path) -> None:
    own = PgServer()
    own.start()
    try:
        server = replicas(store_url=own.new_database(), health_interval=0.2,
                          health_listen="127.0.0.1:0")
        serving = health_pb2.HealthCheckResponse.SERVING
        assert _health(server.health_port) == serving
        assert _mint(server, identity).credential.token
        own.stop()
        with pytest.raises(grpc.RpcError) as err:
            _mint(server, identity)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _code(err.value) == "store_unavailable"
        assert "PostgreSQL store" in (err.value.details() or "")
        _until(lambda: _health(server.health_port) != serving, "SERVING without PostgreSQL")
        assert server.health is not None
        assert any("PostgreSQL" in p for p in server.health.problems)
        _until(lambda: any(p.startswith("audit log") for p in server.health.problems),
               "the audit log in PostgreSQL counts as writable without PostgreSQL")
        own.start()
        _until(lambda: _health(server.health_port) == serving,
               "not SERVING after PostgreSQL returned", 30)
        minted = _mint(server, identity).credential  # the pool reconnected
        # ... and its record is in the database, the chain intact and signed.
        url = server.config.store_url
        assert any(r["type"] == "credential.minted" and r["credential_id"] ==
                   minted.credential_id for r in read_db_records(url))
        assert main(["audit", "verify", "--store", url, "--public-key",
                     str(server.config.audit_key_path.with_suffix(".pub"))]) == 0
    finally:
        own.destroy()


def test_the_audit_log_is_in_the_database_one_chain_per_replica_traced_across_them(
        replicas: Factory, identity: Identity, vault_root: hvac.Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = replicas(), replicas()
    url = a.config.store_url
    chain_a, chain_b = chain_origin(a.replica_id), chain_origin(b.replica_id)
    # Both write at once: each its own chain, every chain intact.
    minted: list[str] = []
    lock = threading.Lock()

    def burst(server: BrokerServer) -> None:
        for _ in range(6):
            cid = _mint(server, identity).credential.credential_id
            with lock:
                minted.append(cid)

    threads = [threading.Thread(target=burst, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(minted) == 24
    # Issued through a, revoked through b.
    cred = _mint(a, identity).credential
    admin = admin_stub(b.port, identity.ca, svid(identity.ca, ADMIN))
    list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
        selector=pb.Selector(credential_ids=[cred.credential_id]), reason="leaked"), timeout=30))
    with pytest.raises(hvac.exceptions.InvalidRequest):  # OpenBao: the token is gone
        vault_root.auth.token.lookup_accessor(cred.credential_id)
    capsys.readouterr()
    assert main(["audit", "trace", cred.credential_id, "--store", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    decided = next(i for i, line in enumerate(lines) if line.startswith("  4. decided"))
    made = next(i for i, line in enumerate(lines) if line.startswith("  6. credential"))
    ended = next(i for i, line in enumerate(lines) if line.startswith("  7. revoked"))
    assert decided < made < ended
    assert lines[decided].endswith(f"[recorded by broker {chain_a}]")
    assert lines[made].endswith(f"[recorded by broker {chain_a}]")
    assert lines[ended].endswith(f"[recorded by broker {chain_b}]")
    assert "leaked" in lines[ended]
    assert main(["audit", "trace", cred.credential_id, "--store", url, "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert (t["decision"]["chain"], t["credentials"][0]["chain"], t["ended"][0]["chain"]) == (
        chain_a, chain_a, chain_b)
    # Every chain, every signature (each replica its own key).
    keys = [arg for s in (a, b) for arg in ("--public-key",
                                            str(s.config.audit_key_path.with_suffix(".pub")))]
    assert main(["audit", "verify", "--store", url, *keys]) == 0
    out = capsys.readouterr().out
    assert f"chain {chain_a}: intact" in out and f"chain {chain_b}: intact" in out
    assert "intact, 2 chain(s)" in out
    # No audit file was written: --audit-log is not used with a store.
    assert a.config.audit_path is not None and not a.config.audit_path.exists()
    assert main(["audit", "export", "--store", url, "--format", "ocsf"]) == 0
    assert sum(1 for line in capsys.readouterr().out.splitlines()
               if json.loads(line)["unmapped"]["type"] == "credential.minted") == 25


def _sql(server: BrokerServer, query: str, *args: object) -> list[tuple[Any, ...]]:
    """The store as PostgreSQL itself answers (not through the broker's code)."""
    with psycopg.connect(server.config.store_url, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()  # type: ignore[arg-type]


def _audit(server: BrokerServer) -> list[dict[str, Any]]:
    """The records ``server`` wrote, as the database holds them (its chain)."""
    return [r for r in read_db_records(server.config.store_url)
            if r["chain"] == chain_origin(server.replica_id)]


def test_a_revocation_or_freeze_through_one_replica_reaches_sidecars_of_another(
        replicas: Factory, identity: Identity, vault_root: hvac.Client) -> None:
    a, b = replicas(), replicas()
    cred = _mint(b, identity).credential  # issued by b, to a sidecar watching b
    stream = stub(b.port, identity.ca, svid(identity.ca, TRIAGE)).WatchRevocations(
        pb.WatchRevocationsRequest(), timeout=60)
    admin = admin_stub(a.port, identity.ca, svid(identity.ca, ADMIN))
    try:
        first = next(stream)
        assert cred.credential_id in first.sync.live_credential_ids
        list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
            selector=pb.Selector(spiffe_id=TRIAGE), reason="leaked in a ticket"), timeout=30))
        event = next(e for e in stream if e.HasField("revoked"))
        assert list(event.revoked.credential_ids) == [cred.credential_id]
        # OpenBao's own view: the token is gone; the store's: revoked, by whom.
        with pytest.raises(hvac.exceptions.InvalidRequest):
            vault_root.auth.token.lookup_accessor(cred.credential_id)
        assert _sql(a, "SELECT state, revoked_by FROM credentials WHERE credential_id=%s",
                    cred.credential_id) == [("revoked", f"automation:{ADMIN}")]
        admin.Freeze(pb.FreezeRequest(action_class="enrichment", reason="bad TI feed"),
                     timeout=30)
        frozen = next(e for e in stream if e.HasField("frozen"))
        assert frozen.frozen.action_class == "enrichment"
        assert frozen.frozen.reason == "bad TI feed"
        kinds = [k for (k,) in _sql(a, "SELECT kind FROM events ORDER BY seq")]
        assert kinds == ["revoked", "freeze"]
    finally:
        stream.cancel()
        try:
            admin.Unfreeze(pb.UnfreezeRequest(action_class="enrichment", reason="done"),
                           timeout=30)
        except grpc.RpcError:
            pass


MAP = Path(__file__).parent.parent / "data" / "approvals-map.yaml"
ISOLATE = {"action_class": "containment.isolate_host", "target": "ws-7",
           "initiating_event": {"source": "splunk", "id": "N-77", "summary": "C2"},
           "justification": "isolate ws-7"}


class _Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        _Hooks.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def approving(bao: OpenBaoDev, identity: Identity, postgres: Any,
              short_tmp: Path) -> Iterator[tuple[Callable[[], BrokerServer], DevIssuer, _Clock]]:
    """Replicas with the approvals map, one dev IdP, one webhook and one clock."""
    d = Path(tempfile.mkdtemp(prefix="rappr-", dir=short_tmp))
    idp = DevIssuer(d)
    hooks = HTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    _Hooks.received = []
    clock = _Clock()
    url = postgres.new_database()
    started: list[BrokerServer] = []

    def make() -> BrokerServer:
        cfg = broker_config(bao, identity, scope_map_path=MAP, store_url=url,
                            approvers=ApproverConfig(
                                issuer=DevIssuer.ISSUER, jwks_path=idp.jwks_path,
                                webhook_url=f"http://127.0.0.1:{hooks.server_port}/hook"))
        server = BrokerServer(cfg, clock=clock)
        server.start()
        started.append(server)
        return server

    yield make, idp, clock
    for s in started:
        if not s.stopped.is_set():
            s.stop(grace=0)
    hooks.shutdown()


def test_an_approval_through_one_replica_releases_the_sidecar_waiting_on_another(
        approving: tuple[Callable[[], BrokerServer], DevIssuer, _Clock], identity: Identity,
        bao: OpenBaoDev, vault_root: hvac.Client, short_tmp: Path) -> None:
    make, idp, _ = approving
    a, b = make(), make()
    sc = start_sidecar(identity, "containment", f"127.0.0.1:{b.port}", short_tmp / "rb.sock")
    try:
        status, pending = sc.client.raw("POST", "/v1/credentials", ISOLATE)
        assert status == 202, pending
        approvals_a = approvals_stub(a.port, identity.ca,
                                     svid(identity.ca, ADMIN, ttl=timedelta(hours=1)))
        # Opened through b, listed through a within a second.
        _until(lambda: pending["approval_id"] in [
            x.id for x in approvals_a.ListApprovals(pb.ListApprovalsRequest(),
                                                   timeout=10).approvals],
            "the approval opened through b is not listed by a", 1.0)
        result: dict[str, Any] = {}

        def wait() -> None:
            result["status"], result["body"] = sc.client.raw(
                "GET", f"/v1/approvals/{pending['approval_id']}?wait=20")
            result["at"] = time.monotonic()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)  # the sidecar waits on b
        info = approvals_a.Approve(pb.ApprovalDecisionRequest(
            approval_id=pending["approval_id"], reason="alice decides",
            id_token=idp.id_token("alice@example.org")), timeout=10)
        assert info.state == "approved"
        waiter.join(25)
        assert result.get("status") == 200, result
        cred = result["body"]
        assert cred["approval"]["approved_by"] == ["alice@example.org"]
        # OpenBao's view: the token b minted is live and does the job.
        meta = vault_root.auth.token.lookup_accessor(cred["credential_id"])["data"]["meta"]
        assert meta["action_class"] == "containment.isolate_host"
        vault_as(bao, cred["token"]).secrets.kv.v2.read_secret_version(
            path="soc/containment/edr", raise_on_deleted_version=False)
        # Used once across the replicas: through a, the same approval is refused.
        with pytest.raises(grpc.RpcError) as err:
            stub(a.port, identity.ca, svid(identity.ca, CONTAINMENT)).IssueCredential(
                pb.IssueCredentialRequest(
                    action_class="containment.isolate_host", target="ws-7",
                    justification="isolate ws-7", approval_id=pending["approval_id"],
                    initiating_event=pb.InitiatingEvent(source="splunk", id="N-77",
                                                        summary="C2")), timeout=15)
        assert "already used" in (err.value.details() or "")
        assert _sql(a, "SELECT state FROM approvals WHERE id=%s",
                    pending["approval_id"]) == [("used",)]
        # The vote is on record in a's chain of the audit log, the use in b's.
        assert any(r["type"] == "approval.approved" and r.get("approval_id") ==
                   pending["approval_id"] for r in _audit(a))
        assert any(r["type"] == "approval.used" and r.get("approval_id") ==
                   pending["approval_id"] for r in _audit(b))
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def test_one_leader_escalates_and_another_takes_over_when_it_dies_or_stops(
        approving: tuple[Callable[[], BrokerServer], DevIssuer, _Clock], identity: Identity
        ) -> None:
    make, _, clock = approving
    a, b = make(), make()
    assert a.leadership is not None and b.leadership is not None
    assert a.leadership.is_leader() and not b.leadership.is_leader()

    def holder() -> list[str]:  # who holds the leader lock, as PostgreSQL says
        return [n for (n,) in _sql(
            a, "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
               "WHERE l.locktype='advisory' AND l.granted AND "
               "(l.classid::bigint << 32 | l.objid::bigint) = %s", LEADER_LOCK)]

    assert holder() == [f"credbroker-leader-{a.replica_id}"]
    # Background work happens once: one escalation webhook, one record, not one per replica.
    status = stub(b.port, identity.ca, svid(identity.ca, CONTAINMENT)).IssueCredential(
        pb.IssueCredentialRequest(action_class="containment.isolate_host", target="ws-1",
                                  justification="isolate",
                                  initiating_event=EVENT), timeout=15)
    approval_id = status.approval.id
    clock.offset = timedelta(minutes=5, seconds=1)
    _until(lambda: bool(_Hooks.received), "no escalation webhook", 5)
    time.sleep(2.5)  # every replica's ticker ran twice meanwhile
    assert [(h["approval_id"], h["notify"]) for h in _Hooks.received] == [
        (approval_id, "ir-oncall")]
    escalated = [[r for r in _audit(s)
                  if r["type"] == "approval.escalated"] for s in (a, b)]
    assert len(escalated[0]) == 1 and escalated[1] == []
    # The leader's session dies (a failover, a network cut): b leads within ~2 s, a knows.
    _sql(a, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name=%s",
         f"credbroker-leader-{a.replica_id}")
    _until(lambda: b.leadership.is_leader() and not a.leadership.is_leader(),
           "b did not take over from a whose session died", 3)
    assert holder() == [f"credbroker-leader-{b.replica_id}"]
    assert a.leadership.lost == 1
    # The leader stops: the lock is handed over at once.
    b.stop(grace=0)
    _until(a.leadership.is_leader, "a did not take over from b, which stopped", 3)
    assert holder() == [f"credbroker-leader-{a.replica_id}"]
