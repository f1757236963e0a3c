"""The asyncio broker: held streams and approval waits cost no worker thread.

The sync server pinned one of its ``max_workers`` threads per ``WatchRevocations`` stream
and per approval wait: a fleet larger than the pool took issuance down for everyone.
Here the pool has 4 threads and many more streams and waits are held while issuance goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.app.approval_desk import MAX_WAITS_PER_IDENTITY
from broker.grpc.server import BrokerServer
from broker.wire.metadata import ERROR_CODE_MD_KEY
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import ADMIN, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, admin_stub, issue_request, stub, svid

FLEET_MAP = """\
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/agent/triage, spiffe://example.org/fleet/*]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
  fleet.gated:
    risk: high
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/fleet/*]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
    approval: {mode: jit, approvers: [ir-leads], escalate_after: 5m, expires: 10m}
"""

WORKERS = 4
STREAMS = 40  # ten times the pool


@pytest.fixture
def fleet_broker(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
                 tmp_path: Path) -> Iterator[BrokerServer]:
    scope_map = tmp_path / "fleet.yaml"
    scope_map.write_text(FLEET_MAP)
    server = BrokerServer(broker_config(bao, identity, scope_map_path=scope_map,
                                        max_workers=WORKERS))
    server.start()
    yield server
    server.stop(grace=0)


def _issue_ok(server: BrokerServer, identity: Identity) -> float:
    s = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
    started = time.perf_counter()
    resp = s.IssueCredential(issue_request("enrichment", target="a", initiating_event=EVENT),
                             timeout=5)
    assert resp.credential.token
    return time.perf_counter() - started


def test_streams_beyond_the_pool_leave_issuance_and_fan_out_working(
        fleet_broker: BrokerServer, identity: Identity) -> None:
    server = fleet_broker
    calls = []
    for i in range(STREAMS):
        s = stub(server.port, identity.ca, svid(identity.ca, f"spiffe://example.org/fleet/a{i}"))
        call = s.WatchRevocations(pb.WatchRevocationsRequest(), timeout=60)
        assert next(call).HasField("sync")
        calls.append(call)
    try:
        assert server.responder is not None and server.responder.bus.streams == STREAMS
        assert _issue_ok(server, identity) < 5
        # A freeze of the class reaches every stream.
        admin = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN))
        admin.Freeze(pb.FreezeRequest(action_class="fleet.gated", reason="scale test"),
                     timeout=10)
        for call in calls:
            ev = next(call)
            assert ev.HasField("frozen") and ev.frozen.action_class == "fleet.gated"
    finally:
        for call in calls:
            call.cancel()


def test_approval_waits_beyond_the_pool_leave_issuance_working_and_are_capped(
        fleet_broker: BrokerServer, identity: Identity) -> None:
    server = fleet_broker
    agents = [f"spiffe://example.org/fleet/w{i}" for i in range(3)]
    waits: list[grpc.Future] = []
    for who in agents:
        s = stub(server.port, identity.ca, svid(identity.ca, who))
        for _ in range(MAX_WAITS_PER_IDENTITY if who == agents[0] else WORKERS):
            resp = s.IssueCredential(issue_request("fleet.gated", target="t",
                                                   initiating_event=EVENT), timeout=5)
            assert resp.approval.state == "pending"
            waits.append(s.AwaitApproval.future(
                pb.AwaitApprovalRequest(approval_id=resp.approval.id, wait_seconds=30),
                timeout=60))
    try:
        deadline = time.monotonic() + 10
        while server.desk is not None and sum(server.desk._waits.values()) < len(waits):
            assert time.monotonic() < deadline, "the waits did not all arrive"
            time.sleep(0.05)
        assert _issue_ok(server, identity) < 5
        # One identity may hold only so many waits.
        s = stub(server.port, identity.ca, svid(identity.ca, agents[0]))
        resp = s.IssueCredential(issue_request("fleet.gated", target="t",
                                               initiating_event=EVENT), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            s.AwaitApproval(pb.AwaitApprovalRequest(approval_id=resp.approval.id,
                                                    wait_seconds=30), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(err.value.trailing_metadata())[ERROR_CODE_MD_KEY] == "too_many_waits"
    finally:
        for w in waits:
            w.cancel()


def test_a_workload_no_class_allows_gets_no_stream(fleet_broker: BrokerServer,
                                                   identity: Identity) -> None:
    s = stub(fleet_broker.port, identity.ca, svid(identity.ca, "spiffe://example.org/nobody"))
    with pytest.raises(grpc.RpcError) as err:
        next(s.WatchRevocations(pb.WatchRevocationsRequest(), timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(err.value.trailing_metadata())[ERROR_CODE_MD_KEY] == "workload_not_allowed"


def test_a_stopping_broker_ends_every_stream(bao: OpenBaoDev, identity: Identity,
                                            vault_root: hvac.Client) -> None:
    server = BrokerServer(broker_config(bao, identity, max_workers=WORKERS))
    server.start()
    s = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
    call = s.WatchRevocations(pb.WatchRevocationsRequest(), timeout=30)
    assert next(call).HasField("sync")
    ended = threading.Event()

    def drain() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass
        ended.set()

    threading.Thread(target=drain, daemon=True).start()
    started = time.monotonic()
    server.stop(grace=5)
    assert ended.wait(5) and time.monotonic() - started < 5
