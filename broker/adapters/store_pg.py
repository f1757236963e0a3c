"""The credential registry on PostgreSQL: one store shared by several broker replicas.

Same SQL and semantics as the SQLite store (:class:`broker.adapters.registry.SqlStore`, one contract
test suite for both); psycopg 3 with a ``psycopg_pool`` connection pool (sync: the store is
called from the broker's executor threads). Every database failure is a
:class:`~broker.adapters.registry.StoreError` (``store_unavailable``): issuance fails closed
with 503 and health says NOT_SERVING until the pool reaches PostgreSQL again; connections are
checked before use, so a restarted server is picked up without restarting the broker.

Budgets are exact across replicas: a decision locks its (identity, class) row in
``budget_keys`` (``SELECT … FOR UPDATE``), counts, and takes its slot in the same
transaction. The schema is versioned (``schema_version``) and migrated under a PostgreSQL
advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from broker.adapters.registry import (
    BUDGET_SCHEMA,
    ENVIRONMENT_COLUMN,
    EVENTS_SCHEMA,
    LEASE_PREFIX_COLUMN,
    SCHEMA,
    SCHEMA_VERSION,
    BudgetHold,
    SqlStore,
    StoreError,
    _dt,
    _ts,
    statements,
)
from broker.errors import ConfigError

#: pg_advisory_xact_lock key held while the schema is migrated ("credbrok" in ASCII).
MIGRATE_LOCK = 0x63726564_62726F6B
#: The first schema version PostgreSQL stores have (versions 1-2 were SQLite-only).
FIRST_PG_VERSION = 3
#: How long a call waits for a pooled connection before the store counts as unavailable.
POOL_TIMEOUT = 5.0

PG_SCHEMA = re.sub(r"\bREAL\b", "DOUBLE PRECISION", SCHEMA + BUDGET_SCHEMA)
PG_EVENTS_SCHEMA = re.sub(r"\bREAL\b", "DOUBLE PRECISION", EVENTS_SCHEMA).replace(
    "INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
#: Version 6: the audit log, one hash chain per broker process (``broker.adapters.audit_pg``).
#: ``audit_chains`` holds each chain's durable size and head and the signed checkpoint of
#: its newest batch, updated in the transaction that inserts the batch's records;
#: ``written`` orders records across chains (a record written after another replica's
#: commit was seen sorts after it); ``audit_checkpoints`` keeps the periodic checkpoints.
AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_chains (
    origin      TEXT PRIMARY KEY,
    size        BIGINT NOT NULL,
    head        TEXT NOT NULL,
    signed_head TEXT NOT NULL DEFAULT '',
    opened_at   DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_records (
    origin  TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    hash    TEXT NOT NULL,
    record  TEXT NOT NULL,
    written BIGSERIAL,
    PRIMARY KEY (origin, seq)
);
CREATE INDEX IF NOT EXISTS audit_records_written ON audit_records (written);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    origin     TEXT NOT NULL,
    size       BIGINT NOT NULL,
    checkpoint TEXT NOT NULL,
    at         DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_checkpoints_origin ON audit_checkpoints (origin, size)
"""
#: NOTIFY channel an appended event wakes the other replicas on (a wake-up only: they
#: poll the sequence anyway, since notifications are not durable).
EVENTS_CHANNEL = "credbroker_events"

_DB_ERRORS = (psycopg.Error, PoolTimeout, PoolClosed)
#: Every exception a PostgreSQL call through the pool raises for an unavailable database.
DB_ERRORS = _DB_ERRORS


def check_url(url: str) -> None:
    """Raises: ConfigError when ``url`` is not a postgresql:// URL."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("--store / CREDBROKER_STORE must be a postgresql:// URL, e.g. "
                          "postgresql://credbroker@db.example:5432/credbroker (the SQLite "
                          "registry is --registry PATH)")


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class _PgHold:
    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], key: tuple[str, str],
                 recent: tuple[datetime, ...]) -> None:
        self._conn, self._key, self.recent = conn, key, recent

    def take(self, when: datetime) -> None:
        self._conn.execute("INSERT INTO budget_uses (spiffe_id, action_class, at) VALUES "
                           "(%s, %s, %s)", (*self._key, _ts(when)))


class PostgresStore(SqlStore):
    """CredentialStore on PostgreSQL, shared by every broker replica given the same URL."""

    shared = True
    _ROW_KEY = "ctid"

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 16,
                 timeout: float = POOL_TIMEOUT) -> None:
        check_url(url)
        self._secret = urlsplit(url).password or ""
        self.url = redact(url)
        self.where = f"the PostgreSQL store {self.url}"
        self._pool = ConnectionPool(url, min_size=1, max_size=max(2, pool_size), open=False,
                                    timeout=timeout, name="credbroker-store",
                                    check=ConnectionPool.check_connection,
                                    kwargs={"connect_timeout": max(1, int(timeout))})
        self._closed = threading.Event()
        self._timeout = timeout
        self._conninfo = url
        try:
            self._pool.open(wait=True, timeout=timeout)
        except _DB_ERRORS as exc:
            self._pool.close()
            raise StoreError(self._failed(exc, "cannot be reached")) from None
        try:
            if migrate:
                self.migrated = self.migrate()
            else:
                self._check_version()
                self.migrated = (SCHEMA_VERSION, SCHEMA_VERSION)
            self.instance_id = self._instance_id()
        except BaseException:
            self._pool.close()
            raise

    def _failed(self, exc: BaseException, what: str = "failed") -> str:
        text = self.redacted(exc)
        return (f"{self.where} {what}: {text} (issuance is refused until the store answers "
                "again)")

    def _instance_id(self) -> str:
        import secrets

        self._exec("INSERT INTO meta (key, value) VALUES ('instance_id', ?) "
                   "ON CONFLICT (key) DO NOTHING", (secrets.token_hex(8),))
        return str(self._exec("SELECT value FROM meta WHERE key='instance_id'")[0][0])

    def migrate(self) -> tuple[int, int]:
        """Bring the schema to :data:`SCHEMA_VERSION` in one transaction, under an advisory
        lock (replicas starting together wait for the first). Returns (before, after).

        Raises: StoreError, also for a schema newer than this code knows.
        """
        try:
            with self._pool.connection() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER "
                             "PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
                row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version"
                                   ).fetchone()
                before = int(row[0]) if row else 0
                if before > SCHEMA_VERSION:
                    raise StoreError(f"{self.where} has schema version {before}, newer than "
                                     f"this broker knows ({SCHEMA_VERSION}): upgrade it")
                if before < FIRST_PG_VERSION:
                    for stmt in statements(PG_SCHEMA):
                        conn.execute(stmt)
                    conn.execute("INSERT INTO schema_version VALUES (%s, %s)",
                                 (FIRST_PG_VERSION, datetime.now(UTC).timestamp()))
                # Later versions: one step each here, in order, like the SQLite store's.
                if before < 4:
                    table, column, definition = LEASE_PREFIX_COLUMN
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                                 f"{definition}")
                    conn.execute("INSERT INTO schema_version VALUES (%s, %s) ON CONFLICT "
                                 "DO NOTHING", (4, datetime.now(UTC).timestamp()))
                if before < 5:
                    conn.execute(PG_EVENTS_SCHEMA)
                    conn.execute("INSERT INTO schema_version VALUES (%s, %s) ON CONFLICT "
                                 "DO NOTHING", (5, datetime.now(UTC).timestamp()))
                if before < 6:
                    for stmt in statements(AUDIT_SCHEMA):
                        conn.execute(stmt)
                    conn.execute("INSERT INTO schema_version VALUES (%s, %s) ON CONFLICT "
                                 "DO NOTHING", (6, datetime.now(UTC).timestamp()))
                if before < 7:
                    table, column, definition = ENVIRONMENT_COLUMN
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                                 f"{definition}")
                    conn.execute("INSERT INTO schema_version VALUES (%s, %s) ON CONFLICT "
                                 "DO NOTHING", (7, datetime.now(UTC).timestamp()))
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc, "could not be migrated")) from None
        return before, SCHEMA_VERSION

    def _check_version(self) -> None:
        have = self.schema_version()
        if have != SCHEMA_VERSION:
            raise StoreError(f"{self.where} has schema version {have}, this broker needs "
                             f"{SCHEMA_VERSION}: run `credbroker store migrate`")

    def schema_version(self) -> int:
        rows = self._exec("SELECT to_regclass('schema_version') IS NOT NULL")
        if not rows or not rows[0][0]:
            return 0
        return super().schema_version()

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            with self._pool.connection() as conn:
                cur = conn.execute(_pg(sql), args)
                return list(cur.fetchall()) if cur.description else []
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc)) from None

    def _count(self, sql: str, args: tuple[object, ...] = ()) -> int:
        try:
            with self._pool.connection() as conn:
                return int(conn.execute(_pg(sql), args).rowcount)
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc)) from None

    def _insert_new(self, sql: str, args: tuple[object, ...]) -> bool:
        try:
            with self._pool.connection() as conn:
                conn.execute(_pg(sql), args)
            return True
        except pgerrors.UniqueViolation:
            return False
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc)) from None

    def _many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(_pg(sql), rows)
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc)) from None

    def append_event(self, *, origin: str, kind: str, data: str, at: datetime) -> int:
        """Append one event under a table lock held to the commit, so sequence numbers
        become visible in order; NOTIFY wakes the other replicas at the commit.

        Raises: StoreError.
        """
        try:
            with self._pool.connection() as conn:
                conn.execute("SET LOCAL lock_timeout = '10s'")
                conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")
                row = conn.execute("INSERT INTO events (origin, kind, data, at) VALUES "
                                   "(%s, %s, %s, %s) RETURNING seq",
                                   (origin, kind, data, _ts(at))).fetchone()
                conn.execute(f"NOTIFY {EVENTS_CHANNEL}")
                return int(row[0]) if row else 0
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc)) from None

    @contextmanager
    def budget_hold(self, spiffe_id: str, action_class: str, now: datetime,
                    horizon: timedelta) -> Iterator[BudgetHold]:
        """Lock the (identity, class) budget row for every replica, count, and commit the
        slot taken (if any) with the lock's release. Raises: StoreError."""
        key = (spiffe_id, action_class)
        try:
            with self._pool.connection() as conn:
                conn.execute("SET LOCAL lock_timeout = '10s'")
                conn.execute("INSERT INTO budget_keys (spiffe_id, action_class) VALUES (%s, %s) "
                             "ON CONFLICT DO NOTHING", key)
                conn.execute("SELECT 1 FROM budget_keys WHERE spiffe_id=%s AND action_class=%s "
                             "FOR UPDATE", key)
                conn.execute("DELETE FROM budget_uses WHERE spiffe_id=%s AND action_class=%s "
                             "AND at <= %s", (*key, _ts(now - horizon)))
                recent = tuple(_dt(float(str(r[0]))) or now for r in conn.execute(
                    "SELECT at FROM budget_uses WHERE spiffe_id=%s AND action_class=%s "
                    "ORDER BY at", key).fetchall())
                yield _PgHold(conn, key, recent)
        except _DB_ERRORS as exc:
            raise StoreError(self._failed(exc)) from None

    def transaction(self) -> AbstractContextManager[psycopg.Connection[tuple[Any, ...]]]:
        """A pooled connection in one transaction: committed when the block ends, rolled
        back when it raises (for writers that commit several statements together, such as
        the audit log). Raises: what :data:`DB_ERRORS` names."""
        return self._pool.connection()

    def redacted(self, exc: BaseException) -> str:
        """A database error's text for a message, with the URL's password cut out."""
        text = " ".join(str(exc).split())[:500] or type(exc).__name__
        return text.replace(self._secret, "***") if self._secret else text

    def session(self, application_name: str) -> psycopg.Connection[tuple[Any, ...]]:
        """A dedicated autocommit connection outside the pool (the leader lock, LISTEN):
        its session is what holds a session-level lock. Dead peers are noticed by TCP
        keepalives on both ends; no statement runs longer than 5 s.

        Raises: psycopg.Error.
        """
        return psycopg.connect(
            self._conninfo, autocommit=True, connect_timeout=max(1, int(self._timeout)),
            application_name=application_name, keepalives=1, keepalives_idle=5,
            keepalives_interval=2, keepalives_count=3,
            options="-c statement_timeout=5000 -c tcp_keepalives_idle=5 "
                    "-c tcp_keepalives_interval=2 -c tcp_keepalives_count=3")

    def check(self) -> None:
        """For health checks: PostgreSQL answers and takes a write (not a read-only standby).

        Raises: StoreError.
        """
        self._exec("UPDATE meta SET value=value WHERE key='instance_id'")

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._pool.close()
