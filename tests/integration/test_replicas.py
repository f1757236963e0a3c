"""Several brokers on one PostgreSQL store and one OpenBao, as replicas run.

Budgets are one budget for all of them (and survive restarts); a freeze made through one
is in force for issuance on the others within a second and is kept by every start-up
Vault sync; a stopped PostgreSQL makes them fail closed and they recover when it returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import hvac
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.devstack import OpenBaoDev
from broker.errors import ERROR_CODE_MD_KEY
from broker.server import BrokerServer
from tests.integration.conftest import ADMIN, CONTAINMENT, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, admin_stub, issue_request, stub, svid
from tests.pgserver import PgServer

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
        frozen_at = time.monotonic()

        def refused_on_b() -> bool:
            try:
                _mint(b, identity)
                return False
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                return True

        _until(refused_on_b, "broker b still issues a class frozen through broker a", 5)
        assert time.monotonic() - frozen_at < 1.0
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

    assert _until(issues_on_a, "broker a still refuses after the unfreeze through b", 5) < 1.0


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
        own.start()
        _until(lambda: _health(server.health_port) == serving,
               "not SERVING after PostgreSQL returned", 30)
        assert _mint(server, identity).credential.token  # the pool reconnected
    finally:
        own.destroy()
