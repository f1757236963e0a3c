"""Every request is on the record: the sidecar answers from its cache only identical requests,
reports each such answer, stops using the cache when it cannot report, and drops its cache
when a new scope map is in force. The broker is a stand-in here."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from sidecar.app import SidecarService
from sidecar.broker_client import BrokerCallError, BrokerClient
from sidecar.hits import HitReporter

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
V1, V2 = "sha256:one", "sha256:two"
T = TypeVar("T")
EVENT = pb.InitiatingEvent(source="splunk", id="N-1", summary="beacon")


class FakeBroker:
    """Mints a new credential per IssueCredential; records (or refuses) reported hits."""

    def __init__(self) -> None:
        self.issued: list[pb.IssueCredentialRequest] = []
        self.reported: list[pb.CacheHit] = []
        self.version = V1
        self.down = False
        self.approval = False

    async def issue(self, msg: pb.IssueCredentialRequest) -> pb.IssueCredentialResponse:
        self.issued.append(msg)
        n = len(self.issued)
        expires = T0 + timedelta(seconds=120)
        resp = pb.IssueCredentialResponse(
            request_id=f"req-{n}",
            credential=pb.Credential(credential_id=f"acc{n}", token=f"s.secret{n}",
                                     policies=["credbroker-enrichment"], ttl_seconds=120),
            decision=pb.Decision(outcome=pb.OUTCOME_ALLOW, action_class=msg.action_class,
                                 rule="r", scope_map_version=self.version))
        resp.credential.expires_at.FromDatetime(expires)
        if self.approval:
            resp.approval.id = "apr-1"
        return resp

    async def report_cache_hits(self, hits: list[pb.CacheHit]
                                ) -> pb.ReportCacheHitsResponse:
        if self.down:
            raise BrokerCallError(503, "broker_unavailable", "the broker is unreachable")
        self.reported.extend(hits)
        return pb.ReportCacheHitsResponse(recorded=len(hits))

    async def revoke(self, credential_id: str, reason: str) -> pb.RevokeCredentialResponse:
        return pb.RevokeCredentialResponse(credential_id=credential_id)


def service(broker: FakeBroker, capacity: int = 1000,
            now: datetime = T0 + timedelta(seconds=1)) -> SidecarService:
    reporter = HitReporter(broker.report_cache_hits, capacity=capacity)
    return SidecarService(cast(BrokerClient, broker), clock=lambda: now, reporter=reporter)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The service's coroutines, run to completion on a loop of their own."""
    return asyncio.run(coro)


def ask(**fields: object) -> pb.IssueCredentialRequest:
    base: dict[str, object] = {"action_class": "enrichment", "target": "h1",
                               "initiating_event": EVENT, "justification": "enrich the alert"}
    base.update(fields)
    return pb.IssueCredentialRequest(**base)  # type: ignore[arg-type]


def test_an_identical_request_is_cached_and_reported() -> None:
    broker = FakeBroker()
    sc = service(broker)
    status, first = run(sc.issue(ask()))
    assert status == 200 and first["cached"] is False
    status, again = run(sc.issue(ask()))
    assert status == 200 and again["cached"] is True
    assert again["credential_id"] == first["credential_id"] and len(broker.issued) == 1
    # The answer names its own request id (the one on the record) and the minting one.
    assert again["request_id"] != first["request_id"]
    assert again["minted_request_id"] == first["request_id"]
    assert sc.reporter.pending == 1 and run(sc.reporter.flush_once())
    (hit,) = broker.reported
    assert (hit.credential_id, hit.request_id) == (first["credential_id"], again["request_id"])
    assert hit.request == ask() and hit.served_at.ToDatetime(tzinfo=UTC) == T0 + \
        timedelta(seconds=1)
    assert sc.reporter.pending == 0


@pytest.mark.parametrize("change", [
    {"initiating_event": pb.InitiatingEvent(source="splunk", id="N-2", summary="beacon")},
    {"justification": "short"},
    {"ttl_seconds": 3600},
    {"ttl_seconds": 60},
    {"target": "h2"},
])
def test_any_other_request_goes_to_the_broker(change: dict[str, object]) -> None:
    broker = FakeBroker()
    sc = service(broker)
    run(sc.issue(ask()))
    status, body = run(sc.issue(ask(**change)))
    assert status == 200 and body["cached"] is False and len(broker.issued) == 2
    assert broker.issued[1] == ask(**change)
    assert sc.reporter.pending == 0  # nothing was served from the cache


def test_approved_and_break_glass_credentials_are_never_cached() -> None:
    broker = FakeBroker()
    broker.approval = True
    sc = service(broker)
    run(sc.issue(ask(break_glass=True)))
    assert len(sc.cache) == 0
    _, body = run(sc.issue(ask(break_glass=True)))
    assert body["cached"] is False
    run(sc.issue(ask(approval_id="apr-1")))
    assert len(sc.cache) == 0
    # A plain request never gets a break-glass credential from the cache either.
    _, body = run(sc.issue(ask()))
    assert body["cached"] is False and len(broker.issued) == 4


def test_when_hits_cannot_be_reported_the_cache_is_not_used_once_the_buffer_is_full() -> None:
    broker = FakeBroker()
    broker.down = True
    sc = service(broker, capacity=2)
    run(sc.issue(ask()))
    assert [run(sc.issue(ask()))[1]["cached"] for _ in range(2)] == [True, True]
    assert not run(sc.reporter.flush_once()) and sc.reporter.pending == 2  # kept, not lost
    _, body = run(sc.issue(ask()))
    assert body["cached"] is False and len(broker.issued) == 2  # asked the broker
    broker.down = False
    assert run(sc.reporter.flush_once()) and sc.reporter.pending == 0
    assert len(broker.reported) == 2
    assert run(sc.issue(ask()))[1]["cached"] is True


def test_the_reporting_task_retries_until_the_broker_answers() -> None:
    broker = FakeBroker()
    broker.down = True
    sc = service(broker)
    run(sc.issue(ask()))
    run(sc.issue(ask()))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(sc.reporter.run(stop))
        try:
            await asyncio.sleep(0.3)
            assert sc.reporter.pending == 1 and not broker.reported
            broker.down = False
            for _ in range(100):
                if not sc.reporter.pending:
                    break
                await asyncio.sleep(0.05)
            assert sc.reporter.pending == 0 and len(broker.reported) == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 2)

    run(scenario())


def test_hits_the_broker_refuses_are_dropped_not_resent() -> None:
    hits: list[list[pb.CacheHit]] = []

    async def send(batch: list[pb.CacheHit]) -> pb.ReportCacheHitsResponse:
        hits.append(batch)
        return pb.ReportCacheHitsResponse(recorded=1, rejected=[pb.RejectedCacheHit(
            index=1, reason="not yours")])

    r = HitReporter(send, batch_size=2)
    for n in range(3):
        assert r.offer(pb.CacheHit(credential_id="acc1", request_id=f"r{n}"))
    assert run(r.flush_once()) and r.pending == 1
    assert run(r.flush_once()) and r.pending == 0
    assert [[h.request_id for h in b] for b in hits] == [["r0", "r1"], ["r2"]]


def test_a_new_scope_map_drops_the_cache() -> None:
    broker = FakeBroker()
    sc = service(broker)
    sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        live_credential_ids=[], scope_map_version=V1)))
    run(sc.issue(ask()))
    assert len(sc.cache) == 1
    # A reconnect whose sync names the same version keeps it (it is live).
    sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        live_credential_ids=["acc1"], scope_map_version=V1)))
    assert len(sc.cache) == 1
    sc.on_revocation_event(pb.RevocationEvent(
        scope_map=pb.RevocationEvent.ScopeMapInForce(version=V2)))
    assert len(sc.cache) == 0
    _, body = run(sc.issue(ask()))
    assert body["cached"] is False  # decided again (the fake still answers V1: not cached)
    broker.version = V2
    run(sc.issue(ask()))
    assert run(sc.issue(ask()))[1]["cached"] is True


def test_a_sync_naming_another_version_drops_the_cache() -> None:
    broker = FakeBroker()
    sc = service(broker)
    run(sc.issue(ask()))
    sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        live_credential_ids=["acc1"], scope_map_version=V2)))
    assert len(sc.cache) == 0


def test_hand_back_drops_the_cache_entry() -> None:
    broker = FakeBroker()
    sc = service(broker)
    _, first = run(sc.issue(ask()))
    run(sc.issue(ask()))  # a second identical call shares it
    run(sc.hand_back(first["credential_id"]))
    _, body = run(sc.issue(ask()))
    assert body["cached"] is False and body["credential_id"] != first["credential_id"]


def test_health_says_how_many_hits_await_reporting() -> None:
    broker = FakeBroker()
    broker.down = True
    sc = service(broker)
    run(sc.issue(ask()))
    run(sc.issue(ask()))
    sc.client = cast(BrokerClient, type("C", (), {"spiffe_id": "spiffe://example.org/a"})())
    status, body = run(sc.health())
    assert status == 200 and body["unreported_cache_hits"] == 1
