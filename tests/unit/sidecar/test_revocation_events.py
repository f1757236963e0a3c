"""Each revocation-stream event on its own, against the sidecar's cache (the broker is a
stand-in): a revoked event drops exactly the credentials it names, an identity freeze
empties the cache, a class freeze drops that class only, a sync drops what is no longer
live (and everything when it says the agent is frozen), and each says what it dropped."""

from __future__ import annotations

import logging

import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from sidecar.app import SidecarService
from tests.unit.sidecar.test_record_of_hits import V1, V2, FakeBroker, ask, run, service


def _filled() -> SidecarService:
    """Three cached credentials: acc1 and acc2 of enrichment, acc3 of containment."""
    sc = service(FakeBroker())
    sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        scope_map_version=V1)))
    run(sc.issue(ask(target="h1")))
    run(sc.issue(ask(target="h2")))
    run(sc.issue(ask(action_class="containment")))
    assert [sc.cache.holds(c) for c in ("acc1", "acc2", "acc3")] == [True, True, True]
    return sc


def _held(sc: SidecarService) -> list[str]:
    return [c for c in ("acc1", "acc2", "acc3") if sc.cache.holds(c)]


def test_a_revoked_event_drops_exactly_the_named_credentials(
        caplog: pytest.LogCaptureFixture) -> None:
    sc = _filled()
    with caplog.at_level(logging.INFO, logger="credbroker.sidecar"):
        sc.on_revocation_event(pb.RevocationEvent(
            revoked=pb.RevocationEvent.Revoked(credential_ids=["acc2", "unknown"])))
    assert _held(sc) == ["acc1", "acc3"]
    assert "cached credential_id=acc2 dropped: revoked" in caplog.messages
    assert not any("unknown" in m for m in caplog.messages)


def test_an_identity_freeze_empties_the_cache() -> None:
    sc = _filled()
    sc.on_revocation_event(pb.RevocationEvent(frozen=pb.RevocationEvent.Frozen(
        identity=True, by="alice", reason="compromised")))
    assert _held(sc) == []


def test_a_class_freeze_drops_that_class_only(caplog: pytest.LogCaptureFixture) -> None:
    sc = _filled()
    with caplog.at_level(logging.WARNING, logger="credbroker.sidecar"):
        sc.on_revocation_event(pb.RevocationEvent(frozen=pb.RevocationEvent.Frozen(
            action_class="enrichment", by="alice", reason="bad class")))
    assert _held(sc) == ["acc3"]
    assert "freeze by alice: bad class; cached credentials dropped" in caplog.messages


def test_a_sync_keeps_only_what_is_live_and_counts_what_it_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    sc = _filled()
    sc.synced.clear()
    with caplog.at_level(logging.INFO, logger="credbroker.sidecar"):
        sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
            live_credential_ids=["acc1", "acc3"], scope_map_version=V1)))
    assert _held(sc) == ["acc1", "acc3"] and sc.synced.is_set()
    assert "revocation stream (re)synchronised; 1 cached credential(s) dropped" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="credbroker.sidecar"):
        sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
            live_credential_ids=["acc1"], scope_map_version=V2)))
    # acc3 is no longer live and acc1 was decided under another map: both counted.
    assert _held(sc) == []
    assert "revocation stream (re)synchronised; 2 cached credential(s) dropped" in caplog.messages


def test_a_sync_saying_frozen_empties_the_cache() -> None:
    sc = _filled()
    sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        live_credential_ids=["acc1", "acc2", "acc3"], scope_map_version=V1, frozen=True)))
    assert _held(sc) == []


def test_a_new_scope_map_says_which_and_how_many(caplog: pytest.LogCaptureFixture) -> None:
    sc = _filled()
    version = "sha256:" + "ab" * 32
    with caplog.at_level(logging.WARNING, logger="credbroker.sidecar"):
        sc.on_revocation_event(pb.RevocationEvent(
            scope_map=pb.RevocationEvent.ScopeMapInForce(version=version)))
    assert _held(sc) == []
    assert ("scope map sha256:abababababab is now in force; 3 cached credential(s) decided "
            "under another dropped") in caplog.messages
