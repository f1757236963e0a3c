"""The SQLite registry's own machinery, mechanism by mechanism: group commit (a batch's
writes succeed or fail together; a taken request id fails only its own write), what a
write that cannot get the database does (another process holds the write lock), the
messages an operator reads, and the rows read back field by field.

Found by mutation testing (docs/mutation.md); the shared semantics are in
``test_store_contract.py``, run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.registry import SCHEMA_VERSION, SqliteStore, StoreError, open_store
from broker.core.revocation import Freeze, Selector
from broker.errors import InvalidRequestError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"
DAY = timedelta(days=1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "registry.db")
    yield s
    s.close()


def intent(store: SqliteStore, rid: str, **kw: object) -> None:
    args: dict[str, object] = {"request_id": rid, "spiffe_id": TRIAGE,
                               "action_class": "enrichment", "target": "t",
                               "event_source": "", "event_id": "", "at": T0}
    store.record_intent(**{**args, **kw})  # type: ignore[arg-type]


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """What the file holds, read by sqlite3 itself."""
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


@contextmanager
def write_locked(path: Path, store: SqliteStore) -> Iterator[None]:
    """Another process holds the database's write lock; the store does not wait for it."""
    store._db.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()
        store._db.execute("PRAGMA busy_timeout=10000")


def queued_together(store: SqliteStore, writes: list[tuple[str, dict[str, object]]]
                    ) -> list[BaseException | None]:
    """Run ``writes`` (record_intent / record_minted calls) from threads that all queue
    while the connection is busy, so one of them commits the whole batch."""
    results: list[BaseException | None] = [None] * len(writes)

    def run(i: int, method: str, kw: dict[str, object]) -> None:
        try:
            getattr(store, method)(**kw)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, m, kw)) for i, (m, kw) in
               enumerate(writes)]
    with store._lock:  # the connection is busy: every write queues
        for t in threads:
            t.start()
        while len(store._queued) < len(writes):
            threading.Event().wait(0.001)
    for t in threads:
        t.join(30)
    return results


def test_writes_queued_together_commit_together_and_a_taken_id_fails_alone(
        store: SqliteStore) -> None:
    intent(store, "taken")
    base = {"spiffe_id": TRIAGE, "action_class": "enrichment", "target": "t",
            "event_source": "", "event_id": "", "at": T0}
    results = queued_together(store, [
        ("record_intent", {"request_id": "a", **base}),
        ("record_intent", {"request_id": "taken", **base}),
        ("record_intent", {"request_id": "b", **base})])
    assert [type(r) for r in results] == [type(None), InvalidRequestError, type(None)]
    assert str(results[1]) == ("request_id 'taken' was already used; send a new one, or none "
                               "and the broker makes one")
    assert sorted(str(r[0]) for r in rows(store.path, "SELECT request_id FROM credentials")) == [
        "a", "b", "taken"]


def test_a_batch_whose_transaction_fails_fails_every_write_in_it(store: SqliteStore) -> None:
    base = {"action_class": "enrichment", "target": "t", "event_source": "", "event_id": "",
            "at": T0}
    results = queued_together(store, [
        ("record_intent", {"request_id": "a", "spiffe_id": TRIAGE, **base}),
        ("record_intent", {"request_id": "b", "spiffe_id": None, **base})])  # NOT NULL
    assert all(isinstance(r, StoreError) for r in results)
    assert {str(r) for r in results} == {
        f"the credential registry {store.path} failed: NOT NULL constraint failed: "
        "credentials.spiffe_id"}
    assert rows(store.path, "SELECT count(*) FROM credentials") == [(0,)]
    intent(store, "c")  # the connection is usable again (no transaction left open)
    assert rows(store.path, "SELECT request_id FROM credentials") == [("c",)]


def test_a_batch_that_cannot_get_the_database_fails_and_leaves_nothing(
        store: SqliteStore) -> None:
    with write_locked(store.path, store), pytest.raises(StoreError) as err:
        intent(store, "r1")
    assert str(err.value) == f"the credential registry {store.path} failed: database is locked"
    assert store._queued == []
    intent(store, "r1")  # the same request id is free: nothing was written
    assert [r.request_id for r in store.intents()] == ["r1"]


def test_a_completion_that_finds_no_pending_issuance_says_what_to_do(
        store: SqliteStore) -> None:
    with pytest.raises(StoreError) as err:
        store.record_minted(request_id="r-none", credential_id="acc-1",
                            expires_at=T0, entity_id="")
    assert str(err.value) == ("the issuance r-none is no longer pending in the registry (it "
                              "took longer than the reconcile loop waits); try again")
    assert err.value.code == "store_unavailable"


def test_many_revocations_that_cannot_get_the_database_change_nothing(
        store: SqliteStore) -> None:
    intent(store, "r1")
    store.record_minted(request_id="r1", credential_id="acc-1", expires_at=T0 + DAY,
                        entity_id="e1")
    with write_locked(store.path, store), pytest.raises(StoreError) as err:
        store.mark_revoked_many(["acc-1"], by="a", reason="r", selector="s", at=T0)
    assert str(err.value) == f"the credential registry {store.path} failed: database is locked"
    assert not store._db.in_transaction
    row = store.get("acc-1")
    assert row is not None and row.state == "live"
    store.mark_revoked_many(["acc-1"], by="a", reason="r", selector="s", at=T0)
    assert rows(store.path, "SELECT state, revoked_at, revoked_by, revoke_reason, "
                "revoke_selector, revoke_pending, revoke_error FROM credentials") == [
        ("revoked", T0.timestamp(), "a", "r", "s", 0, "")]


def test_a_budget_that_cannot_be_held_says_so_and_holds_nothing(store: SqliteStore) -> None:
    with write_locked(store.path, store), pytest.raises(StoreError) as err, \
            store.budget_hold(TRIAGE, "enrichment", T0, DAY):
        pass
    assert str(err.value) == f"the credential registry {store.path} failed: database is locked"
    assert not store._db.in_transaction
    with store.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        hold.take(T0)
    assert rows(store.path, "SELECT spiffe_id, action_class, at FROM budget_uses") == [
        (TRIAGE, "enrichment", T0.timestamp())]


def test_a_budget_slot_at_the_horizon_is_no_longer_counted(store: SqliteStore) -> None:
    with store.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        hold.take(T0)
        hold.take(T0 + timedelta(seconds=1))
    with store.budget_hold(TRIAGE, "enrichment", T0 + DAY, DAY) as hold:
        assert hold.recent == (T0 + timedelta(seconds=1),)  # T0 is exactly a day old
    assert rows(store.path, "SELECT count(*) FROM budget_uses") == [(1,)]


def test_a_budget_hold_whose_commit_fails_raises_a_store_error(store: SqliteStore) -> None:
    with pytest.raises(StoreError) as err, \
            store.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        hold.take(T0)
        store._db.execute("COMMIT")  # the transaction ends under the hold
        store._db.execute("INSERT INTO budget_uses VALUES ('x', 'y', 0)")
    assert "failed: cannot commit - no transaction is active" in str(err.value)
    assert not store._db.in_transaction


def test_rows_are_read_back_field_by_field(store: SqliteStore) -> None:
    intent(store, "r1", environment="lab", event_source="siem", event_id="42")
    store.record_minted(request_id="r1", credential_id="acc-1", expires_at=T0 + DAY,
                        entity_id="e1", lease_prefix="auth/token/create/x")
    store.mark_revoked("acc-1", by="alice", reason="drill", selector="freeze f1", at=T0,
                       pending=True, error="Vault down")
    (row,) = store.pending_revocations()
    assert (row.request_id, row.credential_id, row.spiffe_id, row.action_class, row.target,
            row.issued_at, row.expires_at, row.entity_id, row.state, row.revoke_pending,
            row.lease_prefix, row.environment) == (
        "r1", "acc-1", TRIAGE, "enrichment", "t", T0, T0 + DAY, "e1", "revoked", True,
        "auth/token/create/x", "lab")
    store.mark_revoked("acc-1", by="bob", reason="again", selector="x", at=T0 + DAY,
                       pending=False)
    assert rows(store.path, "SELECT revoked_at, revoked_by, revoke_reason, revoke_selector, "
                "revoke_pending, revoke_error FROM credentials") == [
        (T0.timestamp(), "alice", "drill", "freeze f1", 0, "")]  # the first facts stay


def test_a_freeze_is_read_back_field_by_field(store: SqliteStore) -> None:
    fz = Freeze(id="f1", kind="spiffe_id", pattern=TRIAGE, reason="drill", by="alice",
                created_at=T0)
    store.add_freeze(fz, ["e2", "e1", "e2"])
    assert rows(store.path, "SELECT entity_ids, enforced, enforce_error FROM freezes") == [
        ("e1,e2", 0, "")]
    store.set_freeze_enforcement("f1", entity_ids=["e3"], enforced=True, error="x" * 2000)
    assert rows(store.path, "SELECT entity_ids, enforced, length(enforce_error) FROM "
                "freezes") == [("e3", 1, 1000)]
    store.lift_freezes("spiffe_id", TRIAGE, by="bob", reason="over", at=T0 + DAY)
    assert rows(store.path, "SELECT lifted_at, lifted_by, lift_reason FROM freezes") == [
        ((T0 + DAY).timestamp(), "bob", "over")]


def test_live_narrows_by_class_and_by_one_credential_in_sql(store: SqliteStore) -> None:
    for n, cls in enumerate(("enrichment", "containment", "enrichment")):
        intent(store, f"r{n}", action_class=cls, at=T0 + timedelta(seconds=n))
        store.record_minted(request_id=f"r{n}", credential_id=f"acc-{n}",
                            expires_at=T0 + DAY, entity_id="")

    def ids(sel: Selector) -> list[str]:
        return [r.credential_id for r in store.live(sel, T0)]

    assert ids(Selector.build(action_class="containment")) == ["acc-1"]
    assert ids(Selector.build(credential_ids=["acc-2"])) == ["acc-2"]
    assert ids(Selector.build(credential_ids=["acc-0", "acc-2"])) == ["acc-0", "acc-2"]
    assert store.live(Selector.build(all=True), T0 + DAY) == []  # expired exactly now


def test_a_store_without_a_registry_or_url_says_what_to_pass() -> None:
    with pytest.raises(StoreError) as err:
        open_store()
    assert str(err.value) == ("no credential registry: pass --store postgresql://… or "
                              "--registry PATH")


def test_an_unopenable_registry_names_its_path(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError) as err:
        SqliteStore(tmp_path / "dir.db")
    assert str(err.value).startswith(f"cannot open the credential registry {tmp_path}/dir.db: ")


def test_a_registry_opened_without_migrating_keeps_its_version(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqliteStore(path).close()
    again = SqliteStore(path, migrate=False)
    assert again.migrated == (0, 0) and again.schema_version() == SCHEMA_VERSION
    again.close()
    fresh = SqliteStore(tmp_path / "fresh.db")
    assert fresh.migrated == (0, SCHEMA_VERSION)
    assert [v for (v,) in rows(fresh.path, "SELECT version FROM schema_version ORDER BY "
                               "version")] == list(range(1, SCHEMA_VERSION + 1))
    fresh.close()


def test_a_check_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    store = SqliteStore(path)
    path.rename(tmp_path / "moved.db")
    with pytest.raises(StoreError) as err:
        store.check()
    assert str(err.value) == (f"the credential registry {path} is gone (No such file or "
                              "directory); restart the broker once the file is back")
    SqliteStore(path).close()
    with pytest.raises(StoreError) as err:
        store.check()
    assert str(err.value) == (f"the credential registry {path} was replaced under the "
                              "running broker; restart it")
    store.close()


def test_every_migration_step_is_idempotent(tmp_path: Path) -> None:
    """A registry whose version rows say less than its tables hold (the last unversioned
    schema had some columns already) upgrades again without failing."""
    path = tmp_path / "registry.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM schema_version WHERE version > 1")
    again = SqliteStore(path)
    assert again.migrated == (1, SCHEMA_VERSION)
    columns = {r[1] for r in rows(path, "PRAGMA table_info(credentials)")}
    assert {"environment", "lease_prefix"} <= columns
    again.close()


def test_a_write_refused_by_the_database_names_the_registry_and_why(store: SqliteStore) -> None:
    with sqlite3.connect(store.path) as db:
        db.execute("CREATE TRIGGER no_approvals BEFORE INSERT ON approvals "
                   "BEGIN SELECT RAISE(ABORT, 'approvals are closed'); END")
    with pytest.raises(StoreError) as err:
        store.replace_approval("ap-1", "pending", "{}", previous=None)
    assert str(err.value) == f"the credential registry {store.path} failed: approvals are closed"
