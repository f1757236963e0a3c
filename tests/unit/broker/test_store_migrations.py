"""Store set-up: versioned schema and its migrations (SQLite and PostgreSQL), the
``credbroker store migrate`` command, what only a file has (gone, replaced), and failures
worded for the operator without the password."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from broker.adapters.registry import SCHEMA_VERSION, SqliteStore, StoreError, open_store
from broker.adapters.store_pg import FIRST_PG_VERSION
from broker.app.budget import StoreBudget
from broker.cli.main import main
from broker.errors import ConfigError
from credbroker_dev.devpg import PgServer

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"
SCHEMA_DAY = timedelta(days=1)

#: The first release's registry: freezes without the enforcement columns, no versions.
FIRST_RELEASE = """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('instance_id', 'cafe0123cafe0123');
    CREATE TABLE credentials (request_id TEXT PRIMARY KEY, credential_id TEXT UNIQUE,
        spiffe_id TEXT NOT NULL, action_class TEXT NOT NULL, target TEXT NOT NULL DEFAULT '',
        event_source TEXT NOT NULL DEFAULT '', event_id TEXT NOT NULL DEFAULT '',
        issued_at REAL NOT NULL, expires_at REAL, entity_id TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL, revoked_at REAL, revoked_by TEXT, revoke_reason TEXT,
        revoke_selector TEXT, revoke_pending INTEGER NOT NULL DEFAULT 0, revoke_error TEXT);
    INSERT INTO credentials (request_id, credential_id, spiffe_id, action_class, issued_at,
        expires_at, state) VALUES ('r1', 'acc-1', 'spiffe://example.org/agent/triage',
        'enrichment', 0, 99999999999, 'live');
    CREATE TABLE approvals (id TEXT PRIMARY KEY, state TEXT NOT NULL, data TEXT NOT NULL);
    CREATE TABLE freezes (id TEXT PRIMARY KEY, kind TEXT NOT NULL, pattern TEXT NOT NULL,
        reason TEXT NOT NULL, by TEXT NOT NULL, created_at REAL NOT NULL,
        entity_ids TEXT NOT NULL DEFAULT '', lifted_at REAL, lifted_by TEXT,
        lift_reason TEXT);
    INSERT INTO freezes (id, kind, pattern, reason, by, created_at)
        VALUES ('old', 'action_class', 'enrichment', 'r', 'a', 0);
"""


def _first_release(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(FIRST_RELEASE)
    db.commit()
    db.close()


def test_the_first_release_registry_is_upgraded_keeping_everything(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _first_release(path)
    store = SqliteStore(path)
    assert store.migrated == (0, SCHEMA_VERSION)
    assert store.instance_id == "cafe0123cafe0123"
    assert [f.id for f in store.freezes()] == ["old"]
    assert store.unenforced_freezes() == []  # enforced before enforcement was recorded
    row = store.get("acc-1")
    assert row is not None and row.state == "live"
    with store.budget_hold(TRIAGE, "enrichment", T0, SCHEMA_DAY) as hold:
        assert hold.recent == ()  # the budget tables exist now
    store.close()
    again = SqliteStore(path)
    assert again.migrated == (SCHEMA_VERSION, SCHEMA_VERSION)  # idempotent
    again.close()





def test_store_migrate_command_on_an_sqlite_registry(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.db"
    _first_release(path)
    assert main(["store", "migrate", "--registry", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema_version_before"] == 0 and out["schema_version"] == SCHEMA_VERSION
    assert main(["store", "migrate", "--registry", str(path)]) == 0
    assert "current; nothing to do" in capsys.readouterr().out


def test_a_schema_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this broker knows"):
        SqliteStore(path)


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


def test_postgres_migrates_once_when_replicas_start_together(postgres: PgServer,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    url = postgres.new_database()
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            s = open_store(url=url, pool_size=2)
            results.append(s.migrated)
            s.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3
    with psycopg.connect(url) as conn:
        # each step recorded once: PostgreSQL starts at FIRST_PG_VERSION, then each later one
        assert conn.execute("SELECT version FROM schema_version ORDER BY version"
                            ).fetchall() == [(v,) for v in range(FIRST_PG_VERSION,
                                                                   SCHEMA_VERSION + 1)]
    assert main(["store", "migrate", "--store", url]) == 0
    assert "current; nothing to do" in capsys.readouterr().out


def test_postgres_not_migrated_is_refused_when_migration_is_off(postgres: PgServer) -> None:
    url = postgres.new_database()
    with pytest.raises(StoreError, match="credbroker store migrate"):
        open_store(url=url, migrate=False)


def test_an_unreachable_postgres_fails_closed_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://credbroker:s3cret-pw@/credbroker?host={tmp_path}"
    with pytest.raises(StoreError) as caught:
        open_store(url=url)
    text = str(caught.value)
    assert "s3cret-pw" not in text and "cannot be reached" in text
    assert "credbroker:***@" in text


def test_a_store_url_must_be_postgresql() -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        open_store(url="mysql://x/y")


def test_store_budget_blocks_only_its_own_identity_and_class(postgres: PgServer) -> None:
    store = open_store(url=postgres.new_database(), pool_size=4)
    usage = StoreBudget(store)
    other_done, same_done = threading.Event(), threading.Event()
    a, b = (TRIAGE, "enrichment"), ("spiffe://example.org/agent/other", "enrichment")

    def spend(key: tuple[str, str], done: threading.Event) -> None:
        with usage.spend(key, T0, lambda recent: (done.set(), False)):
            pass

    def take(recent: tuple[datetime, ...]) -> tuple[tuple[datetime, ...], bool]:
        return recent, True

    def look(recent: tuple[datetime, ...]) -> tuple[tuple[datetime, ...], bool]:
        return recent, False

    gate = threading.Event()

    def slow_take(recent: tuple[datetime, ...]) -> tuple[tuple[datetime, ...], bool]:
        threading.Thread(target=spend, args=(b, other_done)).start()
        threading.Thread(target=spend, args=(a, same_done)).start()
        assert other_done.wait(5)  # another identity decides meanwhile
        assert not same_done.wait(0.2)  # the same key waits for this decision
        gate.set()
        return recent, True

    with usage.spend(a, T0, slow_take) as recent:
        assert recent == ()
    assert gate.is_set() and same_done.wait(5)
    with usage.spend(a, T0, look) as recent:
        assert recent == (T0,)  # the slot taken was committed with the decision
    with pytest.raises(RuntimeError, match="mint failed"):
        with usage.spend(a, T0, take) as recent:
            assert recent == (T0,)
            raise RuntimeError("mint failed")  # nothing issued: the new slot is given back
    with usage.spend(a, T0, look) as recent:
        assert recent == (T0,)
    with usage.spend(a, T0, take, counted=False) as recent:
        assert recent == ()  # a class without a budget holds and counts nothing
    with usage.spend(a, T0, look) as recent:
        assert recent == (T0,)
    store.close()
    with pytest.raises(StoreError):
        with usage.spend(a, T0, take):
            pass  # the store is gone: nothing is decided
