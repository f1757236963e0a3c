"""The credential registry: every credential the broker minted, and every freeze.

SQLite by default (one file, WAL, ``synchronous=FULL``: a committed row is on
disk); PostgreSQL (``broker.adapters.store_pg``) for several replicas sharing one registry.
The broker talks to either only through :class:`CredentialStore`; both share the
SQL of :class:`SqlStore` and run the same contract tests.

Crash safety: an *intent* row is committed before Vault is asked to mint and
completed with the accessor after; intents left behind by a crash are resolved
at start-up (``Broker.reconcile``). Revocations Vault did not confirm are kept
as ``revoke_pending`` and retried until done.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from broker.core.revocation import Freeze, Selector
from broker.errors import CredbrokerError, InvalidRequestError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    request_id      TEXT PRIMARY KEY,
    credential_id   TEXT UNIQUE,
    spiffe_id       TEXT NOT NULL,
    action_class    TEXT NOT NULL,
    target          TEXT NOT NULL DEFAULT '',
    event_source    TEXT NOT NULL DEFAULT '',
    event_id        TEXT NOT NULL DEFAULT '',
    issued_at       REAL NOT NULL,
    expires_at      REAL,
    entity_id       TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL,          -- intent, ambiguous, live, revoked
    revoked_at      REAL,
    revoked_by      TEXT,
    revoke_reason   TEXT,
    revoke_selector TEXT,
    revoke_pending  INTEGER NOT NULL DEFAULT 0,
    revoke_error    TEXT
);
CREATE INDEX IF NOT EXISTS credentials_live ON credentials (state, expires_at);
CREATE INDEX IF NOT EXISTS credentials_spiffe ON credentials (spiffe_id);
CREATE TABLE IF NOT EXISTS approvals (
    id    TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    data  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS freezes (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    pattern     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    by          TEXT NOT NULL,
    created_at  REAL NOT NULL,
    entity_ids  TEXT NOT NULL DEFAULT '',
    lifted_at   REAL,
    lifted_by   TEXT,
    lift_reason TEXT,
    enforced    INTEGER NOT NULL DEFAULT 0,  -- Vault refuses the match (entity/policy)
    enforce_error TEXT NOT NULL DEFAULT ''
);
"""

#: Issuances counted against ``limits.per_workload`` budgets, shared by every broker on
#: the store. ``budget_keys`` holds one row per (identity, class): the lock a decision
#: holds while it counts and takes a slot.
BUDGET_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_keys (
    spiffe_id    TEXT NOT NULL,
    action_class TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, action_class)
);
CREATE TABLE IF NOT EXISTS budget_uses (
    spiffe_id    TEXT NOT NULL,
    action_class TEXT NOT NULL,
    at           REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_uses_key ON budget_uses (spiffe_id, action_class, at);
"""

#: Version 5: what one replica did that the others must act on (revocations, freezes,
#: approval changes), in commit order: ``seq`` is assigned under a table lock held to the
#: commit (PostgreSQL) or SQLite's write lock, so a reader that has seen ``seq`` N has
#: seen every event before it (a hole is a rolled-back insert, never a late one).
EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    origin  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL,
    at      REAL NOT NULL
)
"""

#: The schema version this code writes. 1: the first release (freezes without the
#: enforcement columns); 2: freezes record their enforcement (the last unversioned
#: schema); 3: budgets in the store, and the ``schema_version`` table; 4: each
#: credential's lease prefix; 5: the replicas' event sequence; 6: the audit log in the
#: store (PostgreSQL only: ``broker.adapters.store_pg.AUDIT_SCHEMA``; an SQLite registry's broker
#: keeps the audit log in its file, and version 6 adds nothing to it); 7: each
#: credential's environment.
SCHEMA_VERSION = 7

#: Columns added after the first release: (table, column, definition). Rows written
#: before a column existed get its default (a freeze then was enforced before it was
#: recorded, hence enforced=1).
MIGRATIONS = (
    ("freezes", "enforced", "INTEGER NOT NULL DEFAULT 1"),
    ("freezes", "enforce_error", "TEXT NOT NULL DEFAULT ''"),
)
#: Version 4: the Vault lease path prefix only this credential's identity and class mint
#: under (``sys/leases/revoke-prefix`` ends all of them in one call); '' for older tokens.
LEASE_PREFIX_COLUMN = ("credentials", "lease_prefix", "TEXT NOT NULL DEFAULT ''")
#: Version 7: the environment (its own Vault) the credential was minted in; '' for a
#: broker that declares no environments, and for older rows (its one Vault).
ENVIRONMENT_COLUMN = ("credentials", "environment", "TEXT NOT NULL DEFAULT ''")


class StoreError(CredbrokerError):
    """The credential registry could not be read or written."""

    code = "store_unavailable"


class BudgetHold(Protocol):
    """A (identity, class) budget held for one decision (see :meth:`CredentialStore.budget_hold`).

    ``recent``: the issuances counted in the horizon, oldest first. ``take(when)``
    counts one more; it is committed when the hold is released without an error.
    """

    recent: tuple[datetime, ...]

    def take(self, when: datetime) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialRow:
    request_id: str
    credential_id: str
    spiffe_id: str
    action_class: str
    target: str
    issued_at: datetime
    expires_at: datetime | None
    entity_id: str
    state: str
    revoke_pending: bool
    lease_prefix: str = ""
    #: The environment whose Vault minted it ("": the broker's one Vault).
    environment: str = ""


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One entry of the replicas' event sequence (see :data:`EVENTS_SCHEMA`)."""

    seq: int
    origin: str
    kind: str
    data: str


class CredentialStore(Protocol):
    instance_id: str
    #: True when several brokers may use the store at once (PostgreSQL): none of them may
    #: then treat unfinished issuances as its own crashed ones at start-up.
    shared: bool

    def record_intent(self, *, request_id: str, spiffe_id: str, action_class: str, target: str,
                      event_source: str, event_id: str, at: datetime,
                      environment: str = "") -> None: ...
    def record_minted(self, *, request_id: str, credential_id: str, expires_at: datetime,
                      entity_id: str, lease_prefix: str = "") -> None: ...
    def forget_intent(self, request_id: str) -> None: ...
    def mark_ambiguous(self, request_id: str) -> None: ...
    def intents(self) -> list[CredentialRow]: ...
    def known_credential_ids(self) -> set[str]: ...
    def get(self, credential_id: str) -> CredentialRow | None: ...
    def live(self, selector: Selector, now: datetime) -> list[CredentialRow]: ...
    def live_ids_of(self, spiffe_id: str, now: datetime) -> list[str]: ...
    def count_live(self, now: datetime) -> int: ...
    def initiating_events(self, credential_ids: Iterable[str]) -> dict[str, tuple[str, str]]: ...
    def entity_ids(self, pattern_matches: Selector) -> dict[str, str]: ...
    def mark_revoked(self, credential_id: str, *, by: str, reason: str, selector: str,
                     at: datetime, pending: bool, error: str = "") -> None: ...
    def mark_revoked_many(self, credential_ids: list[str], *, by: str, reason: str,
                          selector: str, at: datetime) -> None: ...
    def pending_revocations(self) -> list[CredentialRow]: ...
    def add_freeze(self, freeze: Freeze, entity_ids: Iterable[str]) -> None: ...
    def set_freeze_enforcement(self, freeze_id: str, *, entity_ids: Iterable[str],
                               enforced: bool, error: str) -> None: ...
    def unenforced_freezes(self) -> list[tuple[Freeze, list[str]]]: ...
    def lift_freezes(self, kind: str, pattern: str, *, by: str, reason: str,
                     at: datetime) -> list[tuple[Freeze, list[str]]]: ...
    def freezes(self) -> list[Freeze]: ...
    def active_freezes(self) -> list[tuple[Freeze, list[str]]]: ...
    def save_approval(self, approval_id: str, state: str, data: str) -> None: ...
    def replace_approval(self, approval_id: str, state: str, data: str, *,
                         previous: str | None) -> bool: ...
    def load_approval(self, approval_id: str) -> str | None: ...
    def load_approvals(self) -> list[str]: ...
    def append_event(self, *, origin: str, kind: str, data: str, at: datetime) -> int: ...
    def events_after(self, seq: int, limit: int = 1000) -> list[StoreEvent]: ...
    def last_event_seq(self) -> int: ...
    def prune_events(self, before: datetime) -> int: ...
    def delete_approval(self, approval_id: str) -> None: ...
    def frozen_entities(self) -> set[str]: ...
    def budget_hold(self, spiffe_id: str, action_class: str, now: datetime,
                    horizon: timedelta) -> AbstractContextManager[BudgetHold]: ...
    def give_back(self, spiffe_id: str, action_class: str, when: datetime) -> None: ...
    def schema_version(self) -> int: ...
    def check(self) -> None: ...
    def close(self) -> None: ...


def _ts(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None



class SqlStore:
    """The registry's semantics in SQL, shared by SQLite and PostgreSQL.

    Subclasses supply the primitives (``?`` placeholders): :meth:`_exec` (one statement,
    its rows), :meth:`_count` (one statement, rows changed), :meth:`_many` (one statement
    per argument tuple, in one transaction), :meth:`_insert_new` (an INSERT; False when a
    unique key is taken) and :meth:`budget_hold`, :meth:`check`, :meth:`close`.
    """

    instance_id: str
    shared = False
    where = "the credential registry"  # for messages: never a password
    #: (schema version found, schema version now) when this store was opened.
    migrated: tuple[int, int] = (0, 0)

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        raise NotImplementedError

    def _count(self, sql: str, args: tuple[object, ...] = ()) -> int:
        raise NotImplementedError

    def _many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        raise NotImplementedError

    def _insert_new(self, sql: str, args: tuple[object, ...]) -> bool:
        raise NotImplementedError

    def _insert_new_grouped(self, sql: str, args: tuple[object, ...]) -> bool:
        """:meth:`_insert_new` for the issuance path; a store that can commit concurrent
        writes together (group commit) does so here."""
        return self._insert_new(sql, args)

    def _count_grouped(self, sql: str, args: tuple[object, ...]) -> int:
        """:meth:`_count` for the issuance path (see :meth:`_insert_new_grouped`)."""
        return self._count(sql, args)

    def budget_hold(self, spiffe_id: str, action_class: str, now: datetime,
                    horizon: timedelta) -> AbstractContextManager[BudgetHold]:
        """Hold the (identity, class) budget for one decision: no other decision, in any
        broker on this store, counts it until the hold is released; a slot taken
        (``hold.take``) is committed with the release. Raises: StoreError."""
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def record_intent(self, *, request_id: str, spiffe_id: str, action_class: str, target: str,
                      event_source: str, event_id: str, at: datetime,
                      environment: str = "") -> None:
        """Raises: InvalidRequestError for a reused request id; StoreError."""
        if not self._insert_new_grouped(
                "INSERT INTO credentials (request_id, spiffe_id, action_class, target, "
                "event_source, event_id, issued_at, state, environment) "
                "VALUES (?,?,?,?,?,?,?, 'intent', ?)",
                (request_id, spiffe_id, action_class, target, event_source, event_id,
                 _ts(at), environment)):
            raise InvalidRequestError(f"request_id {request_id!r} was already used; send a new "
                                      "one, or none and the broker makes one")

    def record_minted(self, *, request_id: str, credential_id: str, expires_at: datetime,
                      entity_id: str, lease_prefix: str = "") -> None:
        """Complete the intent with the minted credential.

        Raises: StoreError, also when the intent is gone (reconcile dropped it as stale):
        the caller then revokes the credential rather than hand out one the registry
        does not know.
        """
        changed = self._count_grouped(
            "UPDATE credentials SET credential_id=?, expires_at=?, entity_id=?, "
            "lease_prefix=?, state='live' WHERE request_id=? AND state IN "
            "('intent', 'ambiguous')",
            (credential_id, _ts(expires_at), entity_id, lease_prefix, request_id))
        if changed != 1:
            raise StoreError(f"the issuance {request_id} is no longer pending in the registry "
                             "(it took longer than the reconcile loop waits); try again")

    def forget_intent(self, request_id: str) -> None:
        """Vault certainly minted nothing for this intent (it refused, or a scan found no
        token for it): drop the row."""
        self._exec("DELETE FROM credentials WHERE request_id=? AND state IN "
                   "('intent', 'ambiguous')", (request_id,))

    def mark_ambiguous(self, request_id: str) -> None:
        """The mint's outcome is unknown (connection lost after sending, 5xx, timeout):
        keep the intent until a scan of Vault resolves it."""
        self._exec("UPDATE credentials SET state='ambiguous' WHERE request_id=? AND "
                   "state='intent'", (request_id,))

    def known_credential_ids(self) -> set[str]:
        """Every credential id (Vault accessor) the registry holds, in any state."""
        return {str(r[0]) for r in self._exec(
            "SELECT credential_id FROM credentials WHERE credential_id IS NOT NULL")}

    _COLS = ("request_id, coalesce(credential_id, ''), spiffe_id, action_class, target, "
             "issued_at, expires_at, entity_id, state, revoke_pending, lease_prefix, environment")

    def _rows(self, where: str, args: tuple[object, ...] = ()) -> list[CredentialRow]:
        return [CredentialRow(request_id=str(r[0]), credential_id=str(r[1]),
                              spiffe_id=str(r[2]), action_class=str(r[3]), target=str(r[4]),
                              issued_at=_dt(r[5]) or datetime.fromtimestamp(0, UTC),  # type: ignore[arg-type]
                              expires_at=_dt(r[6]),  # type: ignore[arg-type]
                              entity_id=str(r[7]), state=str(r[8]), revoke_pending=bool(r[9]),
                              lease_prefix=str(r[10]), environment=str(r[11]))
                for r in self._exec(f"SELECT {self._COLS} FROM credentials WHERE {where}",  # noqa: S608 - constant clauses, bound values
                                    args)]

    def intents(self) -> list[CredentialRow]:
        """Issuances whose mint has not been resolved: in flight, or of unknown outcome."""
        return self._rows("state IN ('intent', 'ambiguous') ORDER BY issued_at")

    def get(self, credential_id: str) -> CredentialRow | None:
        rows = self._rows("credential_id=?", (credential_id,))
        return rows[0] if rows else None

    def live(self, selector: Selector, now: datetime) -> list[CredentialRow]:
        where = "state='live' AND expires_at > ?"
        args: list[object] = [_ts(now)]
        if selector.action_class:
            where += " AND action_class=?"
            args.append(selector.action_class)
        if len(selector.credential_ids) == 1:
            where += " AND credential_id=?"
            args.append(next(iter(selector.credential_ids)))
        return [r for r in self._rows(where + " ORDER BY issued_at", tuple(args))
                if selector.matches(credential_id=r.credential_id, spiffe_id=r.spiffe_id,
                                    action_class=r.action_class, target=r.target,
                                    issued_at=r.issued_at, environment=r.environment)]

    def initiating_events(self, credential_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """credential id -> (event source, event id) of the event it was issued for (read-only;
        credentials issued without one are left out)."""
        ids = sorted(set(credential_ids))
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(ids), 500):  # SQLite caps bound parameters per statement
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for cid, src, eid in self._exec(
                    "SELECT credential_id, event_source, event_id FROM credentials "  # noqa: S608 - placeholders only
                    f"WHERE event_source != '' AND credential_id IN ({marks})", tuple(chunk)):
                out[str(cid)] = (str(src), str(eid))
        return out

    def count_live(self, now: datetime) -> int:
        (row,) = self._exec("SELECT count(*) FROM credentials WHERE state='live' AND "
                            "expires_at > ?", (_ts(now),))
        return int(str(row[0]))

    def live_ids_of(self, spiffe_id: str, now: datetime) -> list[str]:
        return [str(r[0]) for r in self._exec(
            "SELECT credential_id FROM credentials WHERE state='live' AND spiffe_id=? "
            "AND expires_at > ?", (spiffe_id, _ts(now)))]

    def entity_ids(self, pattern_matches: Selector) -> dict[str, str]:
        """Vault entity id -> SPIFFE ID of the identities ``pattern_matches`` selects; an
        entity of a named environment's Vault as ``<environment>#<entity id>``."""
        out: dict[str, str] = {}
        for sid, eid, env in self._exec("SELECT DISTINCT spiffe_id, entity_id, environment "
                                        "FROM credentials WHERE entity_id != ''"):
            if pattern_matches.matches(credential_id="", spiffe_id=str(sid), action_class="",
                                       target="", issued_at=datetime.now(UTC)):
                out[f"{env}#{eid}" if env else str(eid)] = str(sid)
        return out

    def mark_revoked(self, credential_id: str, *, by: str, reason: str, selector: str,
                     at: datetime, pending: bool, error: str = "") -> None:
        self._exec("UPDATE credentials SET state='revoked', revoked_at=coalesce(revoked_at, ?), "
                   "revoked_by=coalesce(revoked_by, ?), revoke_reason=coalesce(revoke_reason, ?), "
                   "revoke_selector=coalesce(revoke_selector, ?), revoke_pending=?, "
                   "revoke_error=? WHERE credential_id=?",
                   (_ts(at), by, reason, selector, int(pending), error, credential_id))

    def mark_revoked_many(self, credential_ids: list[str], *, by: str, reason: str,
                          selector: str, at: datetime) -> None:
        """Record many confirmed revocations in one transaction (one fsync)."""
        self._many("UPDATE credentials SET state='revoked', revoked_at=coalesce(revoked_at, ?), "
                   "revoked_by=coalesce(revoked_by, ?), "
                   "revoke_reason=coalesce(revoke_reason, ?), "
                   "revoke_selector=coalesce(revoke_selector, ?), revoke_pending=0, "
                   "revoke_error='' WHERE credential_id=?",
                   [(_ts(at), by, reason, selector, cid) for cid in credential_ids])

    def pending_revocations(self) -> list[CredentialRow]:
        return self._rows("revoke_pending=1")

    def add_freeze(self, freeze: Freeze, entity_ids: Iterable[str]) -> None:
        """Record a freeze, not yet enforced by Vault (see :meth:`set_freeze_enforcement`)."""
        self._exec("INSERT INTO freezes (id, kind, pattern, reason, by, created_at, entity_ids, "
                   "enforced) VALUES (?,?,?,?,?,?,?,0)",
                   (freeze.id, freeze.kind, freeze.pattern, freeze.reason, freeze.by,
                    _ts(freeze.created_at), ",".join(sorted(set(entity_ids)))))

    def set_freeze_enforcement(self, freeze_id: str, *, entity_ids: Iterable[str],
                               enforced: bool, error: str) -> None:
        """Record the Vault entities a freeze covers and whether Vault enforces it yet."""
        self._exec("UPDATE freezes SET entity_ids=?, enforced=?, enforce_error=? WHERE id=?",
                   (",".join(sorted(set(entity_ids))), int(enforced), error[:1000], freeze_id))

    def unenforced_freezes(self) -> list[tuple[Freeze, list[str]]]:
        """Freezes in force that Vault does not enforce yet (it was unreachable)."""
        return self._freeze_rows("lifted_at IS NULL AND enforced=0 ORDER BY created_at, id")

    def _freeze_rows(self, where: str, args: tuple[object, ...] = ()
                     ) -> list[tuple[Freeze, list[str]]]:
        return [(Freeze(id=str(r[0]), kind=str(r[1]), pattern=str(r[2]), reason=str(r[3]),
                        by=str(r[4]), created_at=_dt(r[5]) or datetime.now(UTC)),  # type: ignore[arg-type]
                 [e for e in str(r[6]).split(",") if e])
                for r in self._exec("SELECT id, kind, pattern, reason, by, created_at, "  # noqa: S608 - constant clauses, bound values
                                    f"entity_ids FROM freezes WHERE {where}", args)]

    def lift_freezes(self, kind: str, pattern: str, *, by: str, reason: str,
                     at: datetime) -> list[tuple[Freeze, list[str]]]:
        lifted = self._freeze_rows("kind=? AND pattern=? AND lifted_at IS NULL", (kind, pattern))
        self._exec("UPDATE freezes SET lifted_at=?, lifted_by=?, lift_reason=? "
                   "WHERE kind=? AND pattern=? AND lifted_at IS NULL",
                   (_ts(at), by, reason, kind, pattern))
        return lifted

    def freezes(self) -> list[Freeze]:
        return [f for f, _ in self._freeze_rows("lifted_at IS NULL ORDER BY created_at, id")]

    def active_freezes(self) -> list[tuple[Freeze, list[str]]]:
        """Freezes in force, each with the Vault entities it disabled."""
        return self._freeze_rows("lifted_at IS NULL ORDER BY created_at, id")

    def frozen_entities(self) -> set[str]:
        return {e for _, es in self._freeze_rows("lifted_at IS NULL") for e in es}

    def save_approval(self, approval_id: str, state: str, data: str) -> None:
        self._exec("INSERT INTO approvals (id, state, data) VALUES (?,?,?) ON CONFLICT(id) DO "
                   "UPDATE SET state=excluded.state, data=excluded.data",
                   (approval_id, state, data))

    def delete_approval(self, approval_id: str) -> None:
        self._exec("DELETE FROM approvals WHERE id=?", (approval_id,))

    def load_approvals(self) -> list[str]:
        return [str(r[0]) for r in self._exec("SELECT data FROM approvals ORDER BY id")]

    def load_approval(self, approval_id: str) -> str | None:
        rows = self._exec("SELECT data FROM approvals WHERE id=?", (approval_id,))
        return str(rows[0][0]) if rows else None

    def replace_approval(self, approval_id: str, state: str, data: str, *,
                         previous: str | None) -> bool:
        """Write the approval only if the store still holds ``previous`` (None: none yet).
        False when another replica changed it first: re-read and decide again."""
        if previous is None:
            return self._insert_new("INSERT INTO approvals (id, state, data) VALUES (?,?,?)",
                                    (approval_id, state, data))
        return self._count("UPDATE approvals SET state=?, data=? WHERE id=? AND data=?",
                           (state, data, approval_id, previous)) == 1

    # -- the replicas' event sequence

    def append_event(self, *, origin: str, kind: str, data: str, at: datetime) -> int:
        """Append one event; returns its sequence number. Raises: StoreError."""
        rows = self._exec("INSERT INTO events (origin, kind, data, at) VALUES (?,?,?,?) "
                          "RETURNING seq", (origin, kind, data, _ts(at)))
        return int(str(rows[0][0]))

    def events_after(self, seq: int, limit: int = 1000) -> list[StoreEvent]:
        return [StoreEvent(int(str(r[0])), str(r[1]), str(r[2]), str(r[3]))
                for r in self._exec("SELECT seq, origin, kind, data FROM events WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (seq, limit))]

    def last_event_seq(self) -> int:
        rows = self._exec("SELECT coalesce(max(seq), 0) FROM events")
        return int(str(rows[0][0])) if rows else 0

    def prune_events(self, before: datetime) -> int:
        """Forget events older than ``before`` (every replica has long read them)."""
        return self._count("DELETE FROM events WHERE at < ?", (_ts(before),))

    def give_back(self, spiffe_id: str, action_class: str, when: datetime) -> None:
        """Un-count one issuance taken at ``when`` (nothing was issued after all)."""
        self._exec("DELETE FROM budget_uses WHERE rowid_key IN (SELECT rowid_key FROM "
                   "budget_uses WHERE spiffe_id=? AND action_class=? AND at=? LIMIT 1)"
                   .replace("rowid_key", self._ROW_KEY),
                   (spiffe_id, action_class, _ts(when)))

    _ROW_KEY = "rowid"

    def schema_version(self) -> int:
        rows = self._exec("SELECT max(version) FROM schema_version")
        return int(str(rows[0][0])) if rows and rows[0][0] is not None else 0


class _SqliteHold:
    def __init__(self, db: sqlite3.Connection, key: tuple[str, str],
                 recent: tuple[datetime, ...]) -> None:
        self._db, self._key, self.recent = db, key, recent

    def take(self, when: datetime) -> None:
        self._db.execute("INSERT INTO budget_uses (spiffe_id, action_class, at) VALUES (?,?,?)",
                         (*self._key, _ts(when)))


#: SQLite schema steps: version -> statements (each step idempotent, so a registry of the
#: last unversioned schema, which had some of them already, upgrades too).
def statements(script: str) -> list[str]:
    """The statements of a schema script (executescript would commit the open transaction)."""
    return [s.strip() for s in script.split(";\n") if s.strip()]


def _sqlite_step(db: sqlite3.Connection, version: int) -> None:
    if version == 1:
        for stmt in statements(SCHEMA):
            db.execute(stmt)
    elif version == 2:
        for table, column, definition in MIGRATIONS:
            have = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    elif version == 3:
        for stmt in statements(BUDGET_SCHEMA):
            db.execute(stmt)
    elif version == 4:
        table, column, definition = LEASE_PREFIX_COLUMN
        have = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    elif version == 5:
        db.execute(EVENTS_SCHEMA)
    # version 6: nothing in SQLite (the audit log of an SQLite broker is its file)
    elif version == 7:
        table, column, definition = ENVIRONMENT_COLUMN
        have = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


@dataclass(slots=True)
class _Queued:
    """A write waiting for the next group commit, and what became of it."""

    sql: str
    args: tuple[object, ...]
    rows: int = 0
    error: StoreError | None = None
    done: bool = False


class SqliteStore(SqlStore):
    """CredentialStore on one SQLite file. Thread-safe (one connection, one lock)."""

    def __init__(self, path: Path, *, migrate: bool = True) -> None:
        self.path = path
        self.where = f"the credential registry {path}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._lock = threading.Lock()
            #: Issuance-path writes waiting for the next group commit.
            self._queued: list[_Queued] = []
            self._queue_lock = threading.Lock()
            if migrate:
                self.migrated = self.migrate()
            row = self._db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
            if row is None:
                self.instance_id = secrets.token_hex(8)
                self._db.execute("INSERT INTO meta VALUES ('instance_id', ?)",
                                 (self.instance_id,))
            else:
                self.instance_id = str(row[0])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the credential registry {path}: {exc}") from None
        st = path.stat()
        self._file_id = (st.st_dev, st.st_ino)

    def migrate(self) -> tuple[int, int]:
        """Bring the schema to :data:`SCHEMA_VERSION` in one IMMEDIATE transaction (other
        processes on the file wait). Returns (version before, version after).

        Raises: StoreError, also for a schema newer than this code knows.
        """
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER "
                           "PRIMARY KEY, applied_at REAL NOT NULL)")
                (before,) = db.execute("SELECT coalesce(max(version), 0) FROM "
                                       "schema_version").fetchone()
                before = int(before)
                if before > SCHEMA_VERSION:
                    raise StoreError(f"{self.where} has schema version {before}, newer than "
                                     f"this broker knows ({SCHEMA_VERSION}): upgrade it")
                for version in range(before + 1, SCHEMA_VERSION + 1):
                    _sqlite_step(db, version)
                    db.execute("INSERT INTO schema_version VALUES (?, ?)",
                               (version, datetime.now(UTC).timestamp()))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return before, SCHEMA_VERSION

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            with self._lock:
                return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"{self.where} failed: {exc}") from None

    def _count(self, sql: str, args: tuple[object, ...] = ()) -> int:
        try:
            with self._lock:
                return int(self._db.execute(sql, args).rowcount)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.where} failed: {exc}") from None

    def _insert_new(self, sql: str, args: tuple[object, ...]) -> bool:
        try:
            with self._lock:
                self._db.execute(sql, args)
            return True
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                return False
            raise StoreError(f"{self.where} failed: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"{self.where} failed: {exc}") from None

    def _insert_new_grouped(self, sql: str, args: tuple[object, ...]) -> bool:
        return self._grouped(sql, args) != -1

    def _count_grouped(self, sql: str, args: tuple[object, ...]) -> int:
        return self._grouped(sql, args)

    def _grouped(self, sql: str, args: tuple[object, ...]) -> int:
        """One write, committed in one transaction with the writes other threads queued
        meanwhile (group commit: one WAL fsync for all of them). Whoever gets the
        connection first commits everything queued; the others find theirs done.
        Returns the rows changed, -1 when a UNIQUE key is taken.

        Raises: StoreError (the batch's transaction failed: none of its writes happened).
        """
        mine = _Queued(sql, args)
        with self._queue_lock:
            self._queued.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._commit_batch(batch)
        if mine.error is not None:
            raise mine.error
        return mine.rows

    def _commit_batch(self, batch: list[_Queued]) -> None:
        """Run ``batch`` in one IMMEDIATE transaction (call holding the lock). Never raises:
        each write gets its result or the batch's error."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for w in batch:
                try:
                    w.rows = int(db.execute(w.sql, w.args).rowcount)
                except sqlite3.IntegrityError as exc:  # this statement only is undone
                    if "UNIQUE" not in str(exc):
                        raise
                    w.rows = -1
            db.execute("COMMIT")
        except BaseException as exc:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for w in batch:
                w.error = StoreError(f"{self.where} failed: {exc}")
            if not isinstance(exc, Exception):
                raise
        finally:
            for w in batch:
                w.done = True

    def _many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with self._lock:  # never leave the connection inside an open transaction
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise StoreError(f"{self.where} failed: {exc}") from None

    @contextmanager
    def budget_hold(self, spiffe_id: str, action_class: str, now: datetime,
                    horizon: timedelta) -> Iterator[BudgetHold]:
        """Count and take budget in one IMMEDIATE transaction: no other decision (in this
        process: the lock; in another process on the file: SQLite's write lock) counts the
        same budget meanwhile. Raises: StoreError."""
        key = (spiffe_id, action_class)
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM budget_uses WHERE spiffe_id=? AND action_class=? AND "
                           "at <= ?", (*key, _ts(now - horizon)))
                recent = tuple(_dt(float(str(r[0]))) or now for r in db.execute(
                    "SELECT at FROM budget_uses WHERE spiffe_id=? AND action_class=? "
                    "ORDER BY at", key))
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreError(f"{self.where} failed: {exc}") from None
            try:
                yield _SqliteHold(db, key, recent)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreError(f"{self.where} failed: {exc}") from None
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def check(self) -> None:
        """For health checks: the registry file is there and takes a durable write.

        Raises: StoreError.
        """
        try:
            st = self.path.stat()
        except OSError as exc:
            raise StoreError(f"the credential registry {self.path} is gone ({exc.strerror}); "
                             "restart the broker once the file is back") from None
        if (st.st_dev, st.st_ino) != self._file_id:
            raise StoreError(f"the credential registry {self.path} was replaced under the "
                             "running broker; restart it")
        self._exec("UPDATE meta SET value=value WHERE key='instance_id'")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(*, url: str = "", registry: Path | None = None, migrate: bool = True,
               pool_size: int = 16) -> SqlStore:
    """The store a configuration names: ``url`` (postgresql://…) wins, else the SQLite file.

    Raises: StoreError (unreachable, or a schema this code cannot use); ConfigError (a URL
    that is not postgresql://).
    """
    if url:
        from broker.adapters.store_pg import PostgresStore, check_url

        check_url(url)
        return PostgresStore(url, migrate=migrate, pool_size=pool_size)
    if registry is None:
        raise StoreError("no credential registry: pass --store postgresql://… or "
                         "--registry PATH")
    return SqliteStore(registry, migrate=migrate)
