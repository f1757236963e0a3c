"""What a broker does to stay in step with other replicas on a shared (PostgreSQL) store.

:class:`ReplicaFollower` reads the store's event sequence (``events``: revocations, freezes
and approval changes, each with a monotonic ``seq``) and the freezes in force every
``interval`` (0.5 s), and acts on what other replicas did: sidecars connected here are told
of credentials revoked and identities or classes frozen through any replica, a freeze is in
force for issuance here, and an approval decided elsewhere releases the sidecar waiting
here. Polling is the mechanism; PostgreSQL's LISTEN/NOTIFY only wakes the poll early
(notifications are not durable, the sequence is).

:class:`Leadership` elects one replica for the background work that would otherwise be
done once per replica (pending-revocation retries and freeze enforcement, the reconcile,
the approval ticker's escalations and expiries, Vault drift correction): a PostgreSQL
session-level advisory lock held on a dedicated connection. The connection is checked
every ``interval``; when it fails the lock is gone (PostgreSQL releases it with the
session) and this replica stops leading at once; another takes the lock within
``interval``. On SQLite there is one broker: it always leads.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from broker.app.responder import BusEvent, Responder
from broker.errors import CredbrokerError

if TYPE_CHECKING:
    import psycopg

    from broker.adapters.registry import SqlStore
    from broker.app.approval_desk import ApprovalDesk

_log = logging.getLogger("credbroker.replicas")

FREEZE_POLL_SECONDS = 0.5
LEADER_CHECK_SECONDS = 1.0
#: Events older than this are deleted (by the leader): every replica read them long ago.
EVENT_RETENTION = timedelta(hours=1)
#: pg_try_advisory_lock key of the leader ("credlead" in ASCII).
LEADER_LOCK = 0x63726564_6C656164


def new_replica_id() -> str:
    """This process's name among the replicas (events it wrote are not acted on twice)."""
    return uuid.uuid4().hex[:12]


class ReplicaFollower:
    def __init__(self, responder: Responder, *, replica_id: str,
                 desk: ApprovalDesk | None = None, interval: float = FREEZE_POLL_SECONDS,
                 leader: Callable[[], bool] = lambda: False) -> None:
        self._responder = responder
        self._store = responder.store
        self.replica_id = replica_id
        self.desk = desk
        self._interval = interval
        self._leader = leader
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._seen = {f.id for f in responder.freezes}
        self._announced: set[str] = set()
        self._failing = False
        self._last_prune = 0.0
        self._seq = self._store.last_event_seq()  # what happened before we started is done
        self._thread = threading.Thread(target=self._run, daemon=True, name="replica-follower")
        self._listener: threading.Thread | None = None

    def start(self) -> ReplicaFollower:
        self._thread.start()
        session = getattr(self._store, "session", None)
        if session is not None:
            self._listener = threading.Thread(target=self._listen, args=(session,), daemon=True,
                                              name="replica-listen")
            self._listener.start()
        return self

    # -- writing

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Tell the other replicas. Never raises: what was done here is done and recorded;
        a replica that misses the event still refuses issuance (freezes are re-read) and
        its sidecars' cached credentials are already powerless in Vault."""
        try:
            self._store.append_event(origin=self.replica_id, kind=kind,
                                     data=json.dumps(data, separators=(",", ":")),
                                     at=datetime.now(UTC))
        except CredbrokerError as exc:
            _log.error("could not tell the other replicas of %s: %s", kind, exc)

    # -- reading

    def poll(self) -> int:
        """Read new events and the freezes once; act on them. Returns how many events of
        other replicas were acted on.

        Raises: StoreError.
        """
        acted = 0
        while True:
            events = self._store.events_after(self._seq)
            for ev in events:
                if ev.origin != self.replica_id:
                    try:  # a StoreError leaves the event to be acted on next round
                        self._apply(ev.kind, json.loads(ev.data))
                        acted += 1
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        _log.error("event %d (%s) from replica %s could not be read: %s",
                                   ev.seq, ev.kind, ev.origin, exc)
                self._seq = ev.seq
            if len(events) < 1000:
                break
        self._poll_freezes()
        return acted

    def _apply(self, kind: str, data: dict[str, Any]) -> None:
        bus = self._responder.bus
        if kind == "revoked":
            owners = {str(k): str(v) for k, v in data["owners"].items()}
            bus.publish(BusEvent(credential_ids=tuple(owners), reason=str(data["reason"]),
                                 by=str(data["by"])), owners=owners)
        elif kind == "freeze":
            self._announced.add(str(data["id"]))
            self._responder.refresh_freezes()
            _log.warning("freeze %s of %s %s (by %s, through another replica) is in force "
                         "here", data["id"], data["kind"], data["pattern"], data["by"])
            bus.publish(BusEvent(
                action_class=str(data["pattern"]) if data["kind"] == "action_class" else "",
                identity_pattern=str(data["pattern"]) if data["kind"] == "spiffe_id" else "",
                reason=str(data["reason"]), by=str(data["by"])))
        elif kind == "approval" and self.desk is not None:
            self.desk.reload(str(data["id"]))
        elif kind == "unfreeze":
            self._responder.refresh_freezes()

    def _poll_freezes(self) -> None:
        """The freezes in force, re-read: issuance here refuses what any replica froze even
        when its event was never written. A new freeze no event announced is announced."""
        known = self._seen | {f.id for f in self._responder.freezes}  # ours are announced
        current = self._responder.refresh_freezes()
        for fz in current:
            if fz.id in known or fz.id in self._announced:
                continue
            _log.warning("freeze %s of %s %s (by %s, through another replica) is in force here",
                         fz.id, fz.kind, fz.pattern, fz.by)
            self._responder.bus.publish(BusEvent(
                action_class=fz.pattern if fz.kind == "action_class" else "",
                identity_pattern=fz.pattern if fz.kind == "spiffe_id" else "",
                reason=fz.reason, by=fz.by))
        self._seen = {f.id for f in current}
        self._announced &= self._seen

    def _prune(self) -> None:
        import time

        if not self._leader() or time.monotonic() - self._last_prune < 60:
            return
        self._last_prune = time.monotonic()
        gone = self._store.prune_events(datetime.now(UTC) - EVENT_RETENTION)
        if gone:
            _log.info("%d replica event(s) older than %s deleted", gone, EVENT_RETENTION)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll()
                self._prune()
                if self._failing:
                    _log.warning("the other replicas' events are read from the store again")
                self._failing = False
            except CredbrokerError as exc:  # issuance fails closed on the store anyway
                if not self._failing:
                    _log.error("cannot read the other replicas' events from the store "
                               "(retrying): %s", exc)
                self._failing = True
            except Exception:  # the loop must outlive any one failure
                _log.exception("following the other replicas failed unexpectedly; retrying")

    def _listen(self, session: Callable[[str], psycopg.Connection[Any]]) -> None:
        """LISTEN for new events and wake the poll at once (best effort: the poll runs
        every ``interval`` anyway)."""
        from broker.adapters.store_pg import EVENTS_CHANNEL

        while not self._stop.is_set():
            try:
                with session(f"credbroker-listen-{self.replica_id}") as conn:
                    conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except Exception as exc:  # a wake-up only: retried, the poll carries on
                _log.debug("LISTEN %s: %s", EVENTS_CHANNEL, exc)
                self._stop.wait(2.0)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


#: Kept for callers of the first version (freezes only).
FreezeFollower = ReplicaFollower


class Leadership:
    """Who does the background work: the holder of the store's leader lock (PostgreSQL), or
    the only broker (SQLite)."""

    def __init__(self, store: SqlStore, *, replica_id: str,
                 interval: float = LEADER_CHECK_SECONDS,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._session: Callable[[str], psycopg.Connection[Any]] | None = \
            getattr(store, "session", None) if store.shared else None
        self.replica_id = replica_id
        self._interval = interval
        self._on_change = on_change
        self._leading = self._session is None
        #: How often this replica lost the lock it held (its session failed).
        self.lost = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="leadership")

    def is_leader(self) -> bool:
        return self._leading

    def start(self) -> Leadership:
        """One attempt now (a lone replica leads from its start), then every ``interval``."""
        if self._session is not None:
            self.step()
            self._thread.start()
        elif self._on_change is not None:
            self._on_change(True)
        return self

    def step(self) -> bool:
        """Take the lock if free, or check that ours still is. Returns whether we lead."""
        assert self._session is not None
        try:
            if self._conn is None:
                self._conn = self._session(f"credbroker-leader-{self.replica_id}")
            if self._leading:
                self._conn.execute("SELECT 1")  # the session lives: the lock is still ours
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                         (LEADER_LOCK,)).fetchone()
                if row and row[0]:
                    self._set(True)
        except Exception as exc:  # psycopg errors, OSError: the session (and lock) is gone
            if self._leading:
                self.lost += 1
                _log.error("LEADERSHIP LOST (the store's session failed: %s); background "
                           "work stops here until the lock is held again", type(exc).__name__)
            self._set(False)
            self._close()
        return self._leading

    def _set(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            _log.warning("replica %s is now the leader: it runs retries, reconcile, approval "
                         "escalation and expiry, and drift checks", self.replica_id)
        if self._on_change is not None:
            try:
                self._on_change(leading)
            except Exception:  # a callback must not stop the election
                _log.exception("leadership change callback failed")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # already broken
                _log.debug("closing the leader session: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.step()

    def stop(self) -> None:
        """Hand over: closing the session releases the lock for another replica at once."""
        self._stop.set()
        if self._session is not None:
            self._thread.join(5)
            self._leading = False
            self._close()
