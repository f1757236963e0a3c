"""The credential registry's state machine on a real SQLite file (no servers).

intent -> live -> revoked (pending or confirmed); intent -> ambiguous -> dropped or
recorded by the reconcile; freezes recorded unenforced, then enforced, then lifted.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.core.revocation import Freeze, Selector
from broker.errors import InvalidRequestError
from broker.registry import SqliteStore, StoreError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"


def _intent(store: SqliteStore, rid: str, at: datetime = T0) -> None:
    store.record_intent(request_id=rid, spiffe_id=TRIAGE, action_class="enrichment",
                        target="t", event_source="", event_id="", at=at)


def _states(store: SqliteStore) -> dict[str, str]:
    return {r.request_id: r.state for r in store.intents()}


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "registry.db")


def test_an_intent_is_unresolved_until_minted(store: SqliteStore) -> None:
    _intent(store, "r1")
    assert _states(store) == {"r1": "intent"}
    assert store.known_credential_ids() == set()
    store.record_minted(request_id="r1", credential_id="acc-1",
                        expires_at=T0 + timedelta(minutes=2), entity_id="e1")
    assert store.intents() == []
    row = store.get("acc-1")
    assert row is not None and row.state == "live" and row.entity_id == "e1"
    assert store.known_credential_ids() == {"acc-1"}
    assert store.count_live(T0) == 1 and store.count_live(T0 + timedelta(minutes=3)) == 0


def test_a_request_id_is_used_once(store: SqliteStore) -> None:
    _intent(store, "r1")
    with pytest.raises(InvalidRequestError, match="already used"):
        _intent(store, "r1")


def test_ambiguous_intent_is_kept_until_resolved(store: SqliteStore) -> None:
    _intent(store, "lost")
    _intent(store, "fine", at=T0 + timedelta(seconds=1))
    store.mark_ambiguous("lost")
    assert _states(store) == {"lost": "ambiguous", "fine": "intent"}
    assert [r.request_id for r in store.intents()] == ["lost", "fine"]  # oldest first
    store.forget_intent("lost")  # a scan showed Vault holds no token for it
    assert _states(store) == {"fine": "intent"}


def test_ambiguous_intent_whose_token_was_found_is_recorded_revoked(store: SqliteStore) -> None:
    """What the reconcile does with a token found for an ambiguous intent."""
    _intent(store, "lost")
    store.mark_ambiguous("lost")
    store.record_minted(request_id="lost", credential_id="acc-9", expires_at=T0, entity_id="")
    store.mark_revoked("acc-9", by="credbroker", reason="outcome lost", selector="reconcile",
                       at=T0, pending=False)
    assert store.intents() == []
    row = store.get("acc-9")
    assert row is not None and row.state == "revoked" and not row.revoke_pending
    assert store.live(Selector.build(all=True), T0 - timedelta(minutes=1)) == []


def test_only_unresolved_rows_can_be_made_ambiguous_or_forgotten(store: SqliteStore) -> None:
    _intent(store, "r1")
    store.record_minted(request_id="r1", credential_id="acc-1",
                        expires_at=T0 + timedelta(minutes=2), entity_id="")
    store.mark_ambiguous("r1")  # too late: it was minted and recorded
    store.forget_intent("r1")  # must never drop a credential's row
    row = store.get("acc-1")
    assert row is not None and row.state == "live"
    store.mark_ambiguous("no-such-request")  # harmless
    store.forget_intent("no-such-request")


def test_pending_revocation_is_retried_until_confirmed(store: SqliteStore) -> None:
    _intent(store, "r1")
    store.record_minted(request_id="r1", credential_id="acc-1",
                        expires_at=T0 + timedelta(minutes=2), entity_id="")
    store.mark_revoked("acc-1", by="admin", reason="drill", selector="freeze f1", at=T0,
                       pending=True, error="Vault unreachable")
    (pending,) = store.pending_revocations()
    assert pending.credential_id == "acc-1" and pending.state == "revoked"
    assert store.live(Selector.build(all=True), T0) == []  # no longer handed out as live
    store.mark_revoked_many(["acc-1"], by="credbroker", reason="retry", selector="pending",
                            at=T0 + timedelta(seconds=5))
    assert store.pending_revocations() == []
    db = sqlite3.connect(store.path)
    by, selector = db.execute("SELECT revoked_by, revoke_selector FROM credentials").fetchone()
    db.close()
    assert (by, selector) == ("admin", "freeze f1")  # the first revocation's facts are kept


def test_freeze_recorded_unenforced_then_enforced_then_lifted(store: SqliteStore) -> None:
    fz = Freeze(id="f1", kind="spiffe_id", pattern=TRIAGE, reason="drill", by="admin",
                created_at=T0)
    store.add_freeze(fz, ["e1"])
    assert [f.id for f in store.freezes()] == ["f1"]  # in force for issuance at once
    assert [(f.id, es) for f, es in store.unenforced_freezes()] == [("f1", ["e1"])]
    store.set_freeze_enforcement("f1", entity_ids=["e1"], enforced=False,
                                 error="Vault unreachable")
    assert [f.id for f, _ in store.unenforced_freezes()] == ["f1"]  # retried
    store.set_freeze_enforcement("f1", entity_ids=["e1", "e2"], enforced=True, error="")
    assert store.unenforced_freezes() == []
    assert store.frozen_entities() == {"e1", "e2"}
    lifted = store.lift_freezes("spiffe_id", TRIAGE, by="admin", reason="over", at=T0)
    assert [f.id for f, _ in lifted] == ["f1"]
    assert store.freezes() == [] and store.active_freezes() == []
    assert store.unenforced_freezes() == []  # a lifted freeze is not enforced any more


def test_unresolved_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    first = SqliteStore(path)
    _intent(first, "lost")
    first.mark_ambiguous("lost")
    first.add_freeze(Freeze(id="f1", kind="action_class", pattern="enrichment", reason="r",
                            by="a", created_at=T0), [])
    instance = first.instance_id
    first.close()
    again = SqliteStore(path)
    assert again.instance_id == instance  # how the broker finds its own tokens in Vault
    assert _states(again) == {"lost": "ambiguous"}
    assert [f.id for f, _ in again.unenforced_freezes()] == ["f1"]


def test_freezes_from_before_enforcement_tracking_count_as_enforced(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE freezes (id TEXT PRIMARY KEY, kind TEXT NOT NULL, pattern TEXT NOT NULL,
            reason TEXT NOT NULL, by TEXT NOT NULL, created_at REAL NOT NULL,
            entity_ids TEXT NOT NULL DEFAULT '', lifted_at REAL, lifted_by TEXT,
            lift_reason TEXT);
        INSERT INTO freezes (id, kind, pattern, reason, by, created_at)
            VALUES ('old', 'action_class', 'enrichment', 'r', 'a', 0);
    """)
    db.commit()
    db.close()
    store = SqliteStore(path)
    assert [f.id for f in store.freezes()] == ["old"]
    assert store.unenforced_freezes() == []


def test_check_fails_when_the_file_is_replaced_or_gone(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    store = SqliteStore(path)
    store.check()
    os.rename(path, tmp_path / "moved.db")
    with pytest.raises(StoreError, match="is gone"):
        store.check()
    SqliteStore(path).close()  # a different file at the path
    with pytest.raises(StoreError, match="replaced"):
        store.check()


def test_a_mint_whose_intent_was_dropped_is_refused(store: SqliteStore) -> None:
    """Reconcile dropped a stale intent while its mint was still under way: recording the
    credential must fail (the caller revokes it) rather than hand out an unknown one."""
    _intent(store, "r-slow")
    store.forget_intent("r-slow")
    with pytest.raises(StoreError, match="no longer pending"):
        store.record_minted(request_id="r-slow", credential_id="acc-slow",
                            expires_at=T0 + timedelta(minutes=2), entity_id="")
    assert store.get("acc-slow") is None
    _intent(store, "r-twice")
    store.record_minted(request_id="r-twice", credential_id="acc-1",
                        expires_at=T0 + timedelta(minutes=2), entity_id="")
    with pytest.raises(StoreError):  # a live row is not completed twice
        store.record_minted(request_id="r-twice", credential_id="acc-2",
                            expires_at=T0 + timedelta(minutes=2), entity_id="")
