"""The audit log in PostgreSQL: one hash chain per broker process, still tamper-evident.

With a PostgreSQL store every replica writes its records into the database, so a record a
replica acknowledged outlives the replica (its pod, its disk). Same records, same chain
hashing and same signed checkpoints as the file (:mod:`broker.core.auditchain`), so one
verification reads both.

One chain per broker process (origin ``<host>/<replica id>``), not one chain for all:
an append never waits for another replica, and a replica cut off from PostgreSQL while it
holds a lock cannot stall every other replica's audit log (and so their issuance). Each
batch is one transaction: lock the chain's head row (``SELECT … FOR UPDATE``), insert the
records chained from the head the database holds, write the new head and its signature
(Ed25519, the broker's key) into that row, commit. A record is acknowledged only after
that commit, so no acknowledged record is unsigned and none is lost with the replica.
Concurrent appends of one process share one transaction (group commit).

Records of different chains are ordered by ``written`` (a sequence drawn when the row is
inserted: a record written after another replica's commit sorts after it), which is how
``audit trace`` follows a credential minted on one replica and revoked on another. Every
chain's first record (``audit.chain_opened``) names the size and head of every chain that
existed then, so deleting a whole chain is caught by the chains opened after it; signed
checkpoints are also mirrored outside the database (``--checkpoint-mirror``).

A commit whose answer is lost (PostgreSQL gone mid-commit) fails the batch though it may
have committed: the next batch continues from the head the database holds, so the chain
stays whole, but the log may then hold a record of a request the broker refused (never
the reverse: no acknowledged record is missing).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from broker.adapters.audit import Appended, GroupCommitFront, append_checkpoint_line
from broker.adapters.store_pg import DB_ERRORS, PostgresStore, redact
from broker.core.auditchain import (
    CHAIN_OPENED,
    GENESIS,
    Checkpoint,
    Verdict,
    canonical,
    chain_hash,
    check_witnesses,
    key_id,
    line_of,
    sign_checkpoint,
    verify_chain,
)
from broker.core.records import rfc3339
from broker.errors import AuditError

_log = logging.getLogger("credbroker.audit")


def chain_origin(replica_id: str) -> str:
    """The name of this process's chain: the host (the pod) and the replica id."""
    return f"{socket.gethostname()}/{replica_id}"


class PostgresAuditLog(GroupCommitFront):
    """This broker process's chain of the audit log in the PostgreSQL store. Thread-safe."""

    def __init__(
        self,
        store: PostgresStore,
        *,
        origin: str,
        signing_key: Ed25519PrivateKey | None = None,
        mirror_path: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_error: Callable[[int], None] = lambda n: None,
    ) -> None:
        """Open a new chain named ``origin`` and write its first record.

        Raises:
            AuditError: PostgreSQL cannot be reached, or a chain of that name exists.
        """
        self._store = store
        self.origin = origin
        self.where = f"the audit log in {store.url} (chain {origin})"
        self.mirror_path = mirror_path
        self.unsigned_at_open = 0  # a batch and its signature commit together
        self._key = signing_key
        self._clock = clock
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: list[tuple[int, dict[str, Any]]] = []  # ticket, record without seq
        self._flushing = False
        self._ticket = 0
        self._done: dict[int, Appended | str] = {}  # ticket -> appended, or why it failed
        self._queued: list[dict[str, Any]] = []  # records that could not be written yet
        self._durable_seq, self._durable_head = 0, GENESIS
        self._last_error = ""
        self._closed = False
        self._open()

    def _open(self) -> None:
        try:
            with self._store.transaction() as conn:
                seen = {str(o): {"size": int(n), "head": str(h)} for o, n, h in conn.execute(
                    "SELECT origin, size, head FROM audit_chains ORDER BY origin").fetchall()}
                if self.origin in seen:
                    raise AuditError(f"{self.where}: a chain named {self.origin} exists "
                                     "already; every broker process opens its own")
                conn.execute("INSERT INTO audit_chains (origin, size, head, opened_at) VALUES "
                              "(%s, 0, %s, %s)", (self.origin, GENESIS.hex(),
                                                  self._clock().timestamp()))
        except DB_ERRORS as exc:
            raise AuditError(self._failed(exc)) from None
        self.append(CHAIN_OPENED, chains=seen)

    def _failed(self, exc: BaseException) -> str:
        return (f"{self.where} is not writable ({self._store.redacted(exc)}); the request "
                "was not carried out")

    def _submit(self, record: dict[str, Any]) -> int:
        self._ticket += 1
        self._pending.append((self._ticket, record))
        return self._ticket

    def _await(self, ticket: int) -> Appended:
        """Wait for the batch holding ``ticket``, or commit it (and every record queued
        meanwhile) in one transaction. Caller holds the condition. Raises: AuditError."""
        while ticket not in self._done:
            if self._flushing:
                self._cond.wait()
                continue
            batch, self._pending = self._pending, []
            self._flushing = True
            self._cond.release()
            try:
                result: list[Appended] | str = self._commit([r for _, r in batch])
            finally:
                self._cond.acquire()
                self._flushing = False
            if isinstance(result, str):
                self._last_error = result
                self._on_error(len(batch))
                _log.error("AUDIT LOG NOT WRITABLE: %s: %s; %d record(s) refused", self.where,
                           result, len(batch))
                for t, _ in batch:
                    self._done[t] = result
            else:
                self._last_error = ""
                self._durable_seq = result[-1].seq
                self._durable_head = bytes.fromhex(result[-1].hash)
                for (t, _), appended in zip(batch, result, strict=True):
                    self._done[t] = appended
            self._cond.notify_all()
        outcome = self._done.pop(ticket)
        if isinstance(outcome, str):
            raise AuditError(f"{self.where} is not writable ({outcome}); the request was not "
                             "carried out")
        return outcome

    def _commit(self, records: list[dict[str, Any]]) -> list[Appended] | str:
        """One transaction: chain ``records`` onto the head the database holds, insert
        them, sign and store the new head. Returns what was appended, or why it failed."""
        if self._closed:
            return "the broker is stopping"
        try:
            with self._store.transaction() as conn:
                conn.execute("SET LOCAL lock_timeout = '10s'")
                conn.execute("SET LOCAL statement_timeout = '10s'")
                row = conn.execute("SELECT size, head FROM audit_chains WHERE origin=%s "
                                   "FOR UPDATE", (self.origin,)).fetchone()
                if row is None:
                    return (f"the row of chain {self.origin} was deleted from audit_chains "
                            "under the running broker; run `credbroker audit verify` and "
                            "restart the broker")
                seq, head = int(row[0]), bytes.fromhex(str(row[1]))
                rows, out = [], []
                for record in records:
                    seq += 1
                    body = canonical({**record, "seq": seq})
                    head = chain_hash(head, body)
                    rows.append((self.origin, seq, head.hex(), body.decode()))
                    out.append(Appended(seq=seq, hash=head.hex()))
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO audit_records (origin, seq, hash, record) "
                                    "VALUES (%s, %s, %s, %s)", rows)
                signed = ""
                if self._key is not None:
                    cp = sign_checkpoint(self._key, origin=self.origin, size=seq, head=head,
                                         time=rfc3339(self._clock()))
                    signed = json.dumps(cp.to_json(), sort_keys=True)
                conn.execute("UPDATE audit_chains SET size=%s, head=%s, signed_head=%s WHERE "
                             "origin=%s", (seq, head.hex(), signed, self.origin))
            return out
        except DB_ERRORS as exc:
            return self._store.redacted(exc)

    def check_writable(self) -> None:
        """For health checks: PostgreSQL takes a write to this chain's row.

        Raises: AuditError (unreachable, read-only, or the chain's row is gone).
        """
        if self._closed:
            raise AuditError(f"{self.where} is closed")
        try:
            with self._store.transaction() as conn:
                cur = conn.execute("UPDATE audit_chains SET size=size WHERE origin=%s",
                                   (self.origin,))
                if cur.rowcount != 1:
                    raise AuditError(f"{self.where} is not writable: the chain's row was "
                                     "deleted from audit_chains; run `credbroker audit "
                                     "verify` and restart the broker")
        except DB_ERRORS as exc:
            raise AuditError(f"{self.where} is not writable "
                             f"({self._store.redacted(exc)})") from None
        with self._cond:
            self._last_error = ""

    # -- checkpoints

    def checkpoint(self) -> Checkpoint | None:
        """Sign the durable head, store it in ``audit_checkpoints`` and append it to the
        mirror file. Returns None without a signing key.

        Raises: AuditError (the database or the mirror file cannot be written).
        """
        if self._key is None:
            return None
        with self._cond:
            size, head = self._durable_seq, self._durable_head
        cp = sign_checkpoint(self._key, origin=self.origin, size=size, head=head,
                             time=rfc3339(self._clock()))
        text = json.dumps(cp.to_json(), sort_keys=True)
        try:
            with self._store.transaction() as conn:
                conn.execute("INSERT INTO audit_checkpoints (origin, size, checkpoint, at) "
                             "VALUES (%s, %s, %s, %s)", (self.origin, size, text,
                                                         self._clock().timestamp()))
        except DB_ERRORS as exc:
            raise AuditError(f"cannot store the audit checkpoint in {self._store.url}: "
                             f"{self._store.redacted(exc)}") from None
        if self.mirror_path is not None:
            append_checkpoint_line(self.mirror_path, text)
        return cp

    def close(self) -> None:
        with self._cond:
            self._closed = True


# --- reading -------------------------------------------------------------------


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A read connection to the store at ``url``. Raises: AuditError (unreachable)."""
    try:
        return psycopg.connect(url, connect_timeout=10, application_name="credbroker-audit")
    except psycopg.Error as exc:
        raise AuditError(f"cannot read the audit log in {redact(url)}: "
                         f"{_clean(exc, url)}") from None


def _clean(exc: BaseException, url: str) -> str:
    from urllib.parse import urlsplit

    text = " ".join(str(exc).split())[:500] or type(exc).__name__
    secret = urlsplit(url).password
    return text.replace(secret, "***") if secret else text


def read_db_records(url: str) -> Iterator[dict[str, Any]]:
    """Every record of every chain in the store at ``url``, in the order they were
    written, each with its ``hash`` and ``chain`` (the broker process that wrote it).

    Raises:
        AuditError: the store cannot be read, has no audit log, or a record is not JSON.
    """
    conn = _connect(url)
    try:
        with conn, conn.cursor(name="credbroker_audit_read") as cur:
            cur.itersize = 2000
            cur.execute("SELECT origin, seq, hash, record FROM audit_records "
                        "ORDER BY written")
            for origin, seq, digest, body in cur:
                try:
                    record: dict[str, Any] = json.loads(body)
                except json.JSONDecodeError:
                    raise AuditError(f"the audit log in {redact(url)}: record {seq} of chain "
                                     f"{origin} is malformed; run `credbroker audit verify "
                                     "--store …`") from None
                record["hash"] = str(digest)
                record["chain"] = str(origin)
                yield record
    except psycopg.errors.UndefinedTable:
        raise AuditError(f"{redact(url)} holds no audit log (schema older than version 6: "
                         "run `credbroker store migrate`)") from None
    except psycopg.Error as exc:
        raise AuditError(f"cannot read the audit log in {redact(url)}: "
                         f"{_clean(exc, url)}") from None


@dataclass(slots=True, kw_only=True)
class ChainVerdict:
    origin: str
    verdict: Verdict


@dataclass(slots=True, kw_only=True)
class DbVerdict:
    """Every chain's verdict, and the problems between chains (a chain deleted whole)."""

    chains: list[ChainVerdict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.verdict.ok for c in self.chains)

    @property
    def records(self) -> int:
        return sum(c.verdict.records for c in self.chains)


def verify_db(url: str, public_keys: list[Ed25519PublicKey],
              mirrored: Sequence[Checkpoint] = ()) -> DbVerdict:
    """Verify every chain in the store at ``url``: each record against its chain, each
    chain against its signed head and periodic checkpoints (stored in the database, and
    ``mirrored`` ones from outside it) when ``public_keys`` are given, and every chain
    against what the chains opened after it saw.

    Raises:
        AuditError: the store cannot be read or holds no audit log.
    """
    keys = {key_id(k): k for k in public_keys}
    out = DbVerdict()
    conn = _connect(url)
    try:
        with conn:
            chains = {str(o): str(s) for o, s in conn.execute(
                "SELECT origin, signed_head FROM audit_chains ORDER BY opened_at, origin")}
            stored: dict[str, list[Checkpoint]] = {}
            for origin, text in conn.execute(
                    "SELECT origin, checkpoint FROM audit_checkpoints ORDER BY at"):
                stored.setdefault(str(origin), []).append(_checkpoint(str(text), origin))
            rows: dict[str, list[tuple[int, str, str]]] = {}
            for origin, seq, digest, body in conn.execute(
                    "SELECT origin, seq, hash, record FROM audit_records ORDER BY origin, seq"):
                rows.setdefault(str(origin), []).append((int(seq), str(digest), str(body)))
    except psycopg.errors.UndefinedTable:
        raise AuditError(f"{redact(url)} holds no audit log (schema older than version 6: "
                         "run `credbroker store migrate`)") from None
    except psycopg.Error as exc:
        raise AuditError(f"cannot read the audit log in {redact(url)}: "
                         f"{_clean(exc, url)}") from None
    for origin in sorted(set(rows) - set(chains)):
        out.problems.append(f"records of chain {origin} but no row of it in audit_chains: its "
                            "row was deleted")
    for origin in sorted({cp.origin for cp in mirrored} | set(stored)):
        if origin not in chains and origin not in rows:
            out.problems.append(f"chain {origin} has signed checkpoints but is missing from "
                                "the database: it was deleted")
    firsts: dict[str, dict[str, Any]] = {}
    heads_at: dict[str, list[str]] = {}
    for origin, signed_head in chains.items():
        chain = rows.get(origin, [])
        heads_at[origin] = [digest for _, digest, _ in chain]
        if chain:
            try:
                firsts[origin] = json.loads(chain[0][2])
            except json.JSONDecodeError:
                pass
        cps = stored.get(origin, []) + [cp for cp in mirrored if cp.origin == origin]
        head = _checkpoint(signed_head, origin) if signed_head and public_keys else None
        if public_keys and head is None and chain:
            out.chains.append(ChainVerdict(origin=origin, verdict=Verdict(
                ok=False, records=len(chain), head="", problem="the signature of its newest "
                "batch (audit_chains.signed_head) is missing: it was removed, or the chain "
                "was written without a signing key")))
            continue
        if head is not None:
            cps.append(head)
        key = None
        if public_keys and cps:
            key = keys.get(cps[-1].key_id) or public_keys[0]
        gap = next((n for n, (seq, _, _) in enumerate(chain, 1) if seq != n), None)
        if gap is not None:
            out.chains.append(ChainVerdict(origin=origin, verdict=Verdict(
                ok=False, records=gap - 1, head=chain[gap - 2][1] if gap > 1 else
                GENESIS.hex(), bad_record=gap,
                problem=f"record {gap} is missing (the next one stored is record "
                        f"{chain[gap - 1][0]}): it was deleted")))
            continue
        lines = (line_of(digest, body.encode()) for _, digest, body in chain)
        out.chains.append(ChainVerdict(origin=origin, verdict=verify_chain(
            lines, cps if public_keys else [], key, signed_to_end=head is not None)))
    out.problems += check_witnesses(firsts, heads_at)
    return out


def _checkpoint(text: str, origin: object) -> Checkpoint:
    try:
        return Checkpoint.from_json(json.loads(text))
    except (ValueError, json.JSONDecodeError) as exc:
        raise AuditError(f"a stored checkpoint of chain {origin} is malformed ({exc}): it was "
                         "edited") from None
