"""The tamper-evident audit log: append-only file, group-committed, fail-closed.

The broker uses it through :class:`AuditTrail`; with a PostgreSQL store the log lives in
the database instead (``broker.adapters.audit_pg``), with the same records, chain and signatures.

``append`` returns only once the record is on disk (written and fsynced). Many
concurrent appends share one fsync (group commit): the first waiting caller
writes and syncs everything queued so far, the others wait for it. If the write
or sync fails, every record of that batch fails, the file is cut back to the
last durable record and the chain head rolls back with it, so the log never
holds a record the broker did not confirm, nor skips one it did.

Chain format and verification: ``broker.core.auditchain``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from broker.core.auditchain import (
    GENESIS,
    Checkpoint,
    canonical,
    chain_hash,
    decode_line,
    encode_line,
    sign_checkpoint,
)
from broker.core.records import rfc3339
from broker.errors import AuditError, ConfigError

_log = logging.getLogger("credbroker.audit")


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    hash: str


class AuditTrail(Protocol):
    """What the broker writes its records through: the file (:class:`AuditLog`) or the
    database (``broker.adapters.audit_pg.PostgresAuditLog``). Every implementation is thread-safe,
    commits concurrent appends together, signs every batch before acknowledging it, and
    fails closed (:class:`~broker.errors.AuditError`)."""

    #: Records found at start that no signature covered (0 where that cannot happen).
    unsigned_at_open: int

    @property
    def size(self) -> int:
        """Records durable in this writer's chain."""
        ...

    @property
    def head(self) -> str:
        """The hash (hex) of this writer's newest durable record."""
        ...

    def append(self, event: str, **fields: Any) -> Appended:
        """Raises: AuditError (the record is not durable)."""
        ...

    def append_many(self, events: list[tuple[str, dict[str, Any]]]) -> list[Appended]:
        """Raises: AuditError (none of them is durable)."""
        ...

    def append_or_queue(self, event: str, **fields: Any) -> Appended | None:
        """Never raises: a record that cannot be written now is kept for the next append."""
        ...

    def check_writable(self) -> None:
        """Raises: AuditError when the log cannot take a write now (health)."""
        ...

    def checkpoint(self) -> Checkpoint | None:
        """Sign the durable head and keep it (and mirror it). Raises: AuditError."""
        ...

    def close(self) -> None: ...


class GroupCommitFront:
    """The appending side both audit logs share: the queue of records still owed to the
    log, one record, several at once, and append-or-queue. A subclass supplies the
    group commit: :meth:`_submit` (a record into the next batch; its ticket) and
    :meth:`_await` (wait for, or run, the batch holding a ticket), both called holding
    ``_cond``."""

    _cond: threading.Condition
    _clock: Callable[[], datetime]
    _queued: list[dict[str, Any]]
    _durable_seq: int
    _durable_head: bytes

    def _submit(self, record: dict[str, Any]) -> int:
        raise NotImplementedError

    def _await(self, ticket: int) -> Appended:
        raise NotImplementedError

    @property
    def size(self) -> int:
        with self._cond:
            return self._durable_seq

    @property
    def head(self) -> str:
        with self._cond:
            return self._durable_head.hex()

    # -- appending

    def append(self, event: str, **fields: Any) -> Appended:
        """Append one record and return once it is durable.

        Raises:
            AuditError: the record could not be made durable; the message says the
                audit log is not writable and why.
        """
        record = {"type": event, "time": rfc3339(self._clock()), **fields}
        with self._cond:
            queued, self._queued = self._queued, []
            tickets = [self._submit(q) for q in queued]
            ticket = self._submit(record)
            error: AuditError | None = None
            for t, q in zip(tickets, queued, strict=True):
                try:
                    self._await(t)
                except AuditError as exc:
                    error = exc
                    self._queued.append(q)  # still owed to the log
            try:
                appended = self._await(ticket)
            except AuditError as exc:
                error = exc
            if error is not None:
                raise error
            if queued:
                _log.warning("audit log: %d queued record(s) written", len(queued))
            return appended

    def append_many(self, events: list[tuple[str, dict[str, Any]]]) -> list[Appended]:
        """Append several records at once (one group commit) and return once all are
        durable, in order.

        Raises:
            AuditError: they could not be made durable (then none of them is).
        """
        if not events:
            return []
        now = rfc3339(self._clock())
        with self._cond:
            tickets = [self._submit({"type": event, "time": now, **fields})
                       for event, fields in events]
            out: list[Appended] = []
            error: AuditError | None = None
            for t in tickets:
                try:
                    out.append(self._await(t))
                except AuditError as exc:
                    error = error or exc
            if error is not None:
                raise error
            return out

    def append_or_queue(self, event: str, **fields: Any) -> Appended | None:
        """For actions that must happen even when the log cannot be written (revocations):
        try to append; if that fails, keep the event for the next successful append and
        alert loudly. Never raises."""
        try:
            return self.append(event, **fields)
        except AuditError as exc:
            record = {"type": event, "time": rfc3339(self._clock()), **fields}
            with self._cond:
                self._queued.append(record)
            _log.error("AUDIT LOG NOT WRITABLE: %s record queued in memory until the log "
                       "accepts writes again: %s (%s)", event, json.dumps(record), exc)
            return None


class AuditLog(GroupCommitFront):
    """One writer's handle on the log file. Thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        origin: str = "credbroker",
        checkpoint_path: Path | None = None,
        mirror_path: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_error: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.path = path
        self._on_error = on_error
        self._last_error = ""
        self._broken = ""
        self.origin = origin
        self.checkpoint_path = checkpoint_path or path.with_name(path.name + ".checkpoints")
        #: The signed checkpoint of the newest durable batch, rewritten with every batch,
        #: so every acknowledged record is covered by a signature (with a signing key).
        self.head_path = head_path_of(path)
        self._head_fd = -1
        #: Records found at start that no signature covered (written, never acknowledged,
        #: before a crash — or appended by someone else).
        self.unsigned_at_open = 0
        self.mirror_path = mirror_path
        self._key = signing_key
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: list[tuple[int, int, bytes, bytes]] = []  # ticket, seq, hash, line
        self._flushing = False
        self._ticket = 0  # never reused, unlike seq after a roll-back
        self._done: dict[int, str | None] = {}  # ticket -> None (durable) or why it failed
        self._sealed: dict[int, Appended] = {}  # ticket -> its place in the chain
        self._queued: list[dict[str, Any]] = []  # events that could not be written yet
        self._fd = -1
        self._open()

    # -- opening and recovery

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror}; the "
                             "broker does not run without a writable audit log") from None
        head, seq, offset = GENESIS, 0, 0
        with os.fdopen(os.dup(fd), "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    _log.warning("audit log %s ends in a partial record (a crash while "
                                 "writing); cutting it off at byte %d", self.path, offset)
                    break
                try:
                    stored, body = decode_line(line)
                except ValueError:
                    os.close(fd)
                    raise AuditError(f"audit log {self.path} record {seq + 1} is malformed; "
                                     "run `credbroker audit verify` and investigate before "
                                     "starting the broker") from None
                if chain_hash(head, body) != stored:
                    os.close(fd)
                    raise AuditError(f"audit log {self.path} fails verification at record "
                                     f"{seq + 1}; run `credbroker audit verify` and investigate "
                                     "before starting the broker")
                head, seq, offset = stored, seq + 1, offset + len(line)
        try:
            if os.fstat(fd).st_size != offset:
                os.ftruncate(fd, offset)
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot repair the audit log {self.path}: {exc.strerror}") from None
        self._fd = fd
        self._head, self._seq = head, seq
        self._durable_seq, self._durable_head, self._durable_offset = seq, head, offset
        if self._key is not None:
            try:
                self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                        0o644)
                signed = os.pread(self._head_fd, _HEAD_SLOT, 0).rstrip(b" \n")
            except OSError as exc:
                os.close(fd)
                raise AuditError(f"cannot open the audit head checkpoint {self.head_path}: "
                                 f"{exc.strerror}") from None
            covered = 0
            if signed:
                try:
                    covered = Checkpoint.from_json(json.loads(signed)).size
                except (ValueError, json.JSONDecodeError):
                    _log.warning("audit head checkpoint %s is unreadable; it is rewritten "
                                 "with the next record", self.head_path)
            self.unsigned_at_open = max(0, seq - covered)
            if self.unsigned_at_open:
                _log.warning("audit log %s: the last %d record(s) were never covered by a "
                             "signature (written before a crash, or appended by someone "
                             "else); the next signature covers them and the log records it",
                             self.path, self.unsigned_at_open)

    def _submit(self, record: dict[str, Any]) -> int:
        """Seal ``record`` into the chain; its ticket. Caller holds the condition."""
        ticket, seq, digest = self._seal(record)
        self._sealed[ticket] = Appended(seq=seq, hash=digest)
        return ticket

    def _await(self, ticket: int) -> Appended:
        """Wait until ``ticket`` is durable. Caller holds the condition. Raises: AuditError."""
        try:
            self._wait_durable(ticket)
        finally:
            appended = self._sealed.pop(ticket)
        return appended

    def _seal(self, record: dict[str, Any]) -> tuple[int, int, str]:
        """Give the record its place in the chain; returns (ticket, seq, hash)."""
        self._seq += 1
        self._ticket += 1
        record["seq"] = self._seq
        body = canonical(record)
        self._head = chain_hash(self._head, body)
        self._pending.append((self._ticket, self._seq, self._head, encode_line(body, self._head)))
        return self._ticket, self._seq, self._head.hex()

    def _wait_durable(self, ticket: int) -> None:
        if self._broken and ticket not in self._done:
            self._done[ticket] = self._broken
            self._pending = [p for p in self._pending if p[0] != ticket]
            self._seq, self._head = self._durable_seq, self._durable_head
        while ticket not in self._done:
            if self._flushing:
                self._cond.wait()
                continue
            batch, self._pending = self._pending, []
            self._flushing = True
            self._cond.release()
            error = None
            data = b"".join(item[3] for item in batch)
            written = 0
            try:
                self._check_same_file()
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
                self._sign_head(batch[-1][1], batch[-1][2])
            except OSError as exc:
                error = exc.strerror or str(exc)
            finally:
                self._cond.acquire()
                self._flushing = False
            if error is None:
                self._last_error = ""
                _, self._durable_seq, self._durable_head, _ = batch[-1]
                self._durable_offset += len(data)
                for item in batch:
                    self._done[item[0]] = None
            else:
                self._roll_back(batch, error, written)
            self._cond.notify_all()
        why = self._done.pop(ticket)
        if why is not None:
            raise AuditError(f"the audit log {self.path} is not writable ({why}); the request "
                             "was not carried out")

    def _sign_head(self, size: int, head: bytes) -> None:
        """Sign the new durable head and make the signature durable before any record of
        the batch is acknowledged. Raises: OSError (the batch then fails)."""
        if self._key is None:
            return
        cp = sign_checkpoint(self._key, origin=self.origin, size=size, head=head,
                             time=rfc3339(self._clock()))
        line = json.dumps(cp.to_json(), sort_keys=True).encode()
        # One fixed-size slot, rewritten in place: a sector-sized write, no growth.
        os.pwrite(self._head_fd, line.ljust(_HEAD_SLOT - 1) + b"\n", 0)
        os.fsync(self._head_fd)

    def _roll_back(self, batch: list[tuple[int, int, bytes, bytes]], why: str,
                   written: int) -> None:
        """A batch failed: cut the file back, fail it and everything sealed after it."""
        try:
            if written:  # part of the batch reached the file: cut it off
                os.ftruncate(self._fd, self._durable_offset)
                os.fsync(self._fd)
        except OSError as exc:
            # Garbage may follow the last good record: refuse every later append rather
            # than write records after it that no verification would accept.
            self._broken = f"could not cut a failed write back ({exc.strerror})"
            _log.critical("audit log %s: %s; no further records will be written until the "
                          "broker restarts (start-up repairs the tail)", self.path, self._broken)
        for item in batch + self._pending:
            self._done[item[0]] = why
        self._last_error = why
        self._on_error(len(batch) + len(self._pending))
        self._pending = []
        self._seq, self._head = self._durable_seq, self._durable_head
        _log.error("AUDIT LOG NOT WRITABLE: %s: %s; %d record(s) refused", self.path, why,
                   len(batch))

    def _check_same_file(self) -> None:
        """The file at the configured path is the one being written.

        Raises: OSError when it was unlinked or replaced (records written now would
        reach no one: fail closed until an operator restores it and restarts).
        """
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            raise OSError(2, "the log file was deleted under the running broker") from None
        mine = os.fstat(self._fd)
        if (at_path.st_dev, at_path.st_ino) != (mine.st_dev, mine.st_ino):
            raise OSError(2, "the log file was replaced under the running broker")

    def check_writable(self) -> None:
        """For health checks. Raises: AuditError if the last write failed or the file is gone."""
        with self._cond:
            if self._fd < 0:
                raise AuditError(f"the audit log {self.path} is closed")
            if self._broken:
                raise AuditError(f"the audit log {self.path} is not writable ({self._broken})")
            try:
                self._check_same_file()
                if self._last_error:
                    # Recover once the cause looks gone (space again, sync works), so a
                    # pod taken out of service by this check can come back.
                    os.fsync(self._fd)
                    if os.statvfs(self.path.parent).f_bavail * os.statvfs(
                            self.path.parent).f_frsize < 1 << 20:
                        raise OSError(28, "less than 1 MiB free")
                    self._last_error = ""
            except OSError as exc:
                raise AuditError(f"the audit log {self.path} is not writable "
                                 f"({self._last_error or exc.strerror})") from None

    # -- checkpoints

    def checkpoint(self) -> Checkpoint | None:
        """Sign the durable head and write it beside the log (and to the mirror).

        Returns None when the log has no signing key. Raises: AuditError.
        """
        if self._key is None:
            return None
        with self._cond:
            size, head = self._durable_seq, self._durable_head
        cp = sign_checkpoint(self._key, origin=self.origin, size=size, head=head,
                             time=rfc3339(self._clock()))
        text = json.dumps(cp.to_json(), sort_keys=True)
        for target in filter(None, (self.checkpoint_path, self.mirror_path)):
            append_checkpoint_line(target, text)
        return cp

    def close(self) -> None:
        with self._cond:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._head_fd >= 0:
                os.close(self._head_fd)
                self._head_fd = -1


def append_checkpoint_line(target: Path, text: str) -> None:
    """Append one signed checkpoint (its JSON) to a checkpoints file, durably.

    Raises: AuditError when the file cannot be written.
    """
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(f"cannot write the audit checkpoint to {target}: "
                         f"{exc.strerror}") from None


_HEAD_SLOT = 512  # bytes of the head checkpoint file: one signed checkpoint, padded


def head_path_of(log: Path) -> Path:
    """Where the signed checkpoint of the newest batch of ``log`` is kept."""
    return log.with_name(log.name + ".head")


def read_head(path: Path) -> Checkpoint | None:
    """The head checkpoint in ``path``, or None when the file does not exist.

    Raises: AuditError when it cannot be read or is not a checkpoint.
    """
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read the head checkpoint {path}: {exc.strerror}") from None
    if not text:
        return None
    try:
        return Checkpoint.from_json(json.loads(text))
    except (ValueError, json.JSONDecodeError) as exc:
        raise AuditError(f"{path} is not a head checkpoint ({exc})") from None


# --- reading -------------------------------------------------------------------


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a log file, in order, with their ``hash``.

    Raises:
        AuditError: the file cannot be read or a line is malformed.
    """
    try:
        f = path.open("rb")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            try:
                stored, body = decode_line(line)
                record: dict[str, Any] = json.loads(body)
            except (ValueError, json.JSONDecodeError):
                raise AuditError(f"{path}: record {n} is malformed; run `credbroker audit "
                                 "verify`") from None
            record["hash"] = stored.hex()
            yield record


def read_checkpoints(path: Path) -> list[Checkpoint]:
    """Raises: AuditError when the file cannot be read or holds a malformed checkpoint."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuditError(f"cannot read checkpoints {path}: {exc.strerror}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(Checkpoint.from_json(json.loads(line)))
            except (ValueError, json.JSONDecodeError) as exc:
                raise AuditError(f"{path}:{n}: not a checkpoint ({exc})") from None
    return out


# --- keys ----------------------------------------------------------------------


def load_or_create_signing_key(path: Path, *, create: bool) -> Ed25519PrivateKey:
    """The broker's checkpoint-signing key (PEM, PKCS#8); created (mode 0600) if asked.

    Raises:
        ConfigError: missing (and not to be created), unreadable, or not Ed25519.
    """
    if not path.exists():
        if not create:
            raise ConfigError(f"audit signing key {path} does not exist; create one with "
                              "`openssl genpkey -algorithm ed25519 -out KEY`")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        path.with_suffix(".pub").write_bytes(pub)
        return key
    try:
        loaded = load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load audit signing key {path}: {exc}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"audit signing key {path} is not an Ed25519 key")
    return loaded
