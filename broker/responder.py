"""What responders do: revoke by selector, freeze and unfreeze, and what keeps it honest.

The kill switch is enforced by Vault, not by the broker's goodwill:

* freezing an identity pattern disables the Vault entity of every matching
  workload: every token bound to it is refused at once and no new one can be
  minted for it;
* freezing an action class rewrites the class's Vault policy to grant nothing:
  policies are evaluated per request, so every live token of the class loses its
  power at once.

Both happen before ``freeze`` returns; the tokens are then revoked in the
background. Revocations Vault does not confirm stay ``revoke_pending`` in the
registry and are retried until done. Sidecars hear about revocations and freezes
through :class:`RevocationBus` (``WatchRevocations``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from broker.audit import AuditLog
from broker.core.revocation import Freeze, Selector, freeze_target
from broker.core.scopemap import ScopeMap
from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import CredbrokerError, NotFoundError, VaultUnavailableError
from broker.observability import Metrics
from broker.registry import CredentialRow, CredentialStore
from broker.vault import VaultAdapter

_log = logging.getLogger("credbroker.responder")


@dataclass(frozen=True, slots=True)
class BusEvent:
    """What a sidecar must drop: credential ids, a whole class, or everything of identities."""

    credential_ids: tuple[str, ...] = ()
    action_class: str = ""
    identity_pattern: str = ""
    reason: str = ""
    by: str = ""


#: A sidecar needs one stream; a few more allow for restarts overlapping.
MAX_STREAMS_PER_IDENTITY = 4


class RevocationBus:
    """Fan-out of revocation events to every watching sidecar."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[int, tuple[str, queue.Queue[BusEvent | None]]] = {}
        self._next = 0

    def subscribe(self, spiffe_id: str) -> tuple[int, queue.Queue[BusEvent | None]] | None:
        """A new subscription, or None when ``spiffe_id`` already holds its share of streams
        (each pins a worker of the sync gRPC server: one workload must not take them all)."""
        q: queue.Queue[BusEvent | None] = queue.Queue()
        with self._lock:
            if sum(1 for sid, _ in self._subs.values() if sid == spiffe_id) \
                    >= MAX_STREAMS_PER_IDENTITY:
                return None
            self._next += 1
            self._subs[self._next] = (spiffe_id, q)
            return self._next, q

    def unsubscribe(self, sub_id: int) -> None:
        with self._lock:
            self._subs.pop(sub_id, None)

    def publish(self, event: BusEvent, owners: dict[str, str] | None = None) -> None:
        """``owners`` maps credential id -> SPIFFE ID, so each sidecar hears only its own."""
        with self._lock:
            subs = list(self._subs.values())
        pattern = SpiffeIdPattern.parse(event.identity_pattern) if event.identity_pattern \
            else None
        for spiffe_id, q in subs:
            if event.credential_ids:
                mine = tuple(c for c in event.credential_ids
                             if owners is None or owners.get(c) == spiffe_id)
                if mine:
                    q.put(BusEvent(credential_ids=mine, reason=event.reason, by=event.by))
            elif event.action_class:
                q.put(event)
            elif pattern is not None and pattern.matches(SpiffeId.parse(spiffe_id)):
                q.put(event)

    def close(self) -> None:
        with self._lock:
            for _, q in self._subs.values():
                q.put(None)


@dataclass(slots=True)
class Outcome:
    credential_id: str
    result: str  # revoked, already_dead, pending, failed
    error: str = ""


class Responder:
    def __init__(self, *, store: CredentialStore, vault: VaultAdapter, audit: AuditLog,
                 bus: RevocationBus, scope_map: Callable[[], ScopeMap],
                 clock: Callable[[], datetime], workers: int = 16) -> None:
        self.store = store
        self.vault = vault
        self.audit = audit
        self.bus = bus
        self._scope_map = scope_map
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="revoke")
        self._freezes = store.freezes()
        self._stop = threading.Event()
        self.last_freeze_revocation: threading.Thread | None = None
        self._freeze_lock = threading.Lock()
        self.metrics: Metrics | None = None

    @property
    def freezes(self) -> list[Freeze]:
        return self._freezes

    @property
    def scope_map(self) -> ScopeMap:
        """The scope map in force now (read-only; for checking what selectors name)."""
        return self._scope_map()

    # -- revocation

    def revoke_one(self, row: CredentialRow, *, by: str, reason: str, selector: str,
                   check: bool = True, record: bool = True) -> Outcome:
        """Revoke in Vault and record it. Never raises: failures become pending or failed.

        With ``record=False`` a confirmed revocation is left for the caller to record
        (in bulk); pending ones are always recorded at once.
        """
        now = self._clock()
        try:
            revoked = self.vault.revoke_accessor(row.credential_id, check=check)
        except VaultUnavailableError as exc:
            try:
                self.store.mark_revoked(row.credential_id, by=by, reason=reason,
                                        selector=selector, at=now, pending=True, error=str(exc))
            except CredbrokerError as store_exc:
                _log.critical("credential_id=%s: Vault unreachable AND the registry failed "
                              "(%s); revoke it by hand", row.credential_id, store_exc)
                return Outcome(row.credential_id, "failed", f"{exc}; {store_exc}")
            return Outcome(row.credential_id, "pending", str(exc))
        except CredbrokerError as exc:
            return Outcome(row.credential_id, "failed", str(exc))
        outcome = Outcome(row.credential_id, "revoked" if revoked else "already_dead")
        if record:
            try:
                self.store.mark_revoked(row.credential_id, by=by, reason=reason,
                                        selector=selector, at=now, pending=False)
            except CredbrokerError as exc:  # revoked in Vault; the registry lags, harmlessly
                _log.error("credential_id=%s revoked in Vault but not recorded: %s",
                           row.credential_id, exc)
        return outcome

    def revoke(self, rows: list[CredentialRow], *, by: str, reason: str, selector: str,
               check: bool = True) -> Iterator[Outcome]:
        """Revoke ``rows`` in parallel; yields each outcome as it completes, then audits."""
        futures = [self._pool.submit(self.revoke_one, r, by=by, reason=reason,
                                     selector=selector, check=check, record=False)
                   for r in rows]
        outcomes: list[Outcome] = []
        confirmed: list[str] = []
        try:
            for f in futures:
                o = f.result()
                outcomes.append(o)
                if self.metrics is not None:
                    self.metrics.revocations.labels(o.result).inc()
                if o.result in ("revoked", "already_dead"):
                    confirmed.append(o.credential_id)
                    if len(confirmed) >= 500:
                        self._record_revoked(confirmed, by, reason, selector)
                        confirmed = []
                yield o
        finally:
            # Even if the caller went away (Ctrl-C on a mass revoke), what Vault revoked
            # is recorded, announced and audited: finish the work, then account for it.
            for f in futures[len(outcomes):]:
                o = f.result()
                outcomes.append(o)
                if o.result in ("revoked", "already_dead"):
                    confirmed.append(o.credential_id)
            if confirmed:
                self._record_revoked(confirmed, by, reason, selector)
            self._announce(outcomes, rows, by=by, reason=reason, selector=selector)

    def _record_revoked(self, ids: list[str], by: str, reason: str, selector: str) -> None:
        try:
            self.store.mark_revoked_many(ids, by=by, reason=reason, selector=selector,
                                         at=self._clock())
        except CredbrokerError as exc:  # revoked in Vault; the registry lags, harmlessly
            _log.error("%d revocations confirmed by Vault could not be recorded: %s",
                       len(ids), exc)

    def _announce(self, outcomes: list[Outcome], rows: list[CredentialRow], *, by: str,
                  reason: str, selector: str) -> None:
        gone = [o.credential_id for o in outcomes if o.result in ("revoked", "already_dead",
                                                                   "pending")]
        self.bus.publish(BusEvent(credential_ids=tuple(gone), reason=reason, by=by),
                         owners={r.credential_id: r.spiffe_id for r in rows})
        self.audit.append_or_queue(
            "credentials.revoked", by=by, reason=reason, selector=selector,
            credential_ids=[o.credential_id for o in outcomes],
            counts={k: sum(1 for o in outcomes if o.result == k)
                    for k in ("revoked", "already_dead", "pending", "failed")},
            failed_ids=[o.credential_id for o in outcomes if o.result == "failed"])

    def retry_pending(self) -> int:
        """Retry revocations Vault did not confirm. Returns how many are still pending."""
        left = 0
        for row in self.store.pending_revocations():
            o = self.revoke_one(row, by="credbroker", reason="retry", selector="pending")
            if o.result == "pending":
                left += 1
            elif o.result in ("revoked", "already_dead"):
                _log.info("pending revocation of %s confirmed by Vault", row.credential_id)
        return left

    def run_retry_loop(self, interval: float = 2.0) -> None:
        while not self._stop.wait(interval):
            try:
                self.retry_pending()
            except CredbrokerError as exc:
                _log.warning("retrying pending revocations failed: %s", exc)

    # -- freeze

    def freeze(self, *, spiffe_id: str, action_class: str, reason: str, by: str
               ) -> tuple[Freeze, int, int, bool, float]:
        """Freeze; returns (freeze, credentials matched, entities disabled, policy frozen, ms).

        Raises:
            InvalidRequestError: malformed target or missing reason.
            NotFoundError: an unknown action class.
            VaultUnavailableError, VaultError: Vault could not enforce it (the freeze of
                new issuance is still recorded and in force).
        """
        started = time.perf_counter()
        kind, pattern = freeze_target(spiffe_id, action_class)
        scope_map = self._scope_map()
        if kind == "action_class" and pattern not in scope_map.classes:
            raise NotFoundError(f"action class {pattern!r} is not in the scope map; known: "
                                f"{', '.join(scope_map.classes)}")
        now = self._clock()
        selector = Selector.build(spiffe_id=spiffe_id, action_class=action_class)
        entities = self.store.entity_ids(selector) if kind == "spiffe_id" else {}
        if kind == "spiffe_id" and "*" not in pattern:
            found = self.vault.entity_of(pattern)  # also an entity this registry never saw
            if found:
                entities[found] = pattern
        fz = Freeze(id=uuid.uuid4().hex[:12], kind=kind, pattern=pattern, reason=reason, by=by,
                    created_at=now)
        with self._freeze_lock:
            self.store.add_freeze(fz, entities)  # durable first: new issuance stops here
            self._freezes = self.store.freezes()
        policy_frozen = False
        vault_error: str = ""
        rows = self.store.live(selector, now)
        try:
            if kind == "spiffe_id":
                for eid in entities:
                    self.vault.set_entity_disabled(eid, True)
            else:
                self.vault.freeze_class_policy(scope_map.classes[pattern])
                policy_frozen = True
        except CredbrokerError as exc:
            vault_error = str(exc)
            raise
        finally:
            # Whatever Vault did, the freeze is in force for issuance: tell the sidecars,
            # put it on record, and revoke (pending if Vault is down, retried until done).
            enforced_ms = (time.perf_counter() - started) * 1000
            self.bus.publish(BusEvent(action_class=pattern if kind == "action_class" else "",
                                      identity_pattern=pattern if kind == "spiffe_id" else "",
                                      reason=reason, by=by))
            self.audit.append_or_queue("freeze", freeze_id=fz.id, kind=kind, pattern=pattern,
                                       reason=reason, by=by, credentials_matched=len(rows),
                                       vault_entities_disabled=sorted(entities),
                                       vault_policy_frozen=policy_frozen,
                                       vault_enforced_ms=round(enforced_ms, 3),
                                       vault_error=vault_error)
            # Revoking them is hygiene when Vault already refuses them: in bulk, without
            # the per-token look-up (they are live per the registry).
            self.last_freeze_revocation = threading.Thread(
                target=lambda: list(self.revoke(rows, by=by, reason=reason,
                                                selector=f"freeze {fz.id}",
                                                check=not policy_frozen and not entities)),
                name="freeze-revoke", daemon=True)
            self.last_freeze_revocation.start()
        return fz, len(rows), len(entities), policy_frozen, enforced_ms

    def unfreeze(self, *, spiffe_id: str, action_class: str, reason: str, by: str
                 ) -> list[Freeze]:
        """Lift the freezes of exactly this pattern or class.

        Raises:
            InvalidRequestError, NotFoundError (nothing frozen like that),
            VaultUnavailableError, VaultError.
        """
        kind, pattern = freeze_target(spiffe_id, action_class)
        if not any(f.kind == kind and f.pattern == pattern for f in self._freezes):
            raise NotFoundError(f"nothing is frozen as {kind.replace('_', ' ')} {pattern!r}; "
                                "see `credbroker freeze --list`")
        # Giving power back is on record first (fail closed: no record, no unfreeze).
        self.audit.append("unfreeze", kind=kind, pattern=pattern, reason=reason, by=by)
        with self._freeze_lock:
            lifted = self.store.lift_freezes(kind, pattern, by=by, reason=reason,
                                             at=self._clock())
            self._freezes = self.store.freezes()
        still = self.store.frozen_entities()
        for _, entities in lifted:
            for eid in entities:
                if eid not in still:
                    self.vault.set_entity_disabled(eid, False)
        scope_map = self._scope_map()
        if kind == "action_class" and pattern in scope_map.classes:
            self.vault.restore_class_policy(scope_map.classes[pattern])
        return [f for f, _ in lifted]

    def frozen_classes(self) -> frozenset[str]:
        return frozenset(f.pattern for f in self._freezes if f.kind == "action_class")

    # -- crash recovery

    def reconcile(self) -> tuple[int, int]:
        """Resolve intents left by a crash between mint and record. Returns (revoked, cleared).

        A token minted for an intent was never handed to anyone (the broker died
        before answering), so it is revoked, not adopted.

        Raises:
            VaultUnavailableError, VaultError: Vault could not be asked.
        """
        intents = self.store.intents()
        if not intents:
            return 0, 0
        wanted = {i.request_id for i in intents}
        revoked = 0
        for accessor, meta in self.vault.managed_accessors(self.store.instance_id).items():
            if meta.get("request_id") in wanted:
                self.vault.revoke_accessor(accessor)
                revoked += 1
                self.audit.append_or_queue(
                    "credential.revoked", credential_id=accessor, request_id=meta["request_id"],
                    spiffe_id=meta.get("spiffe_id", ""), by="credbroker",
                    selector="crash-recovery",
                    reason="minted before a crash, never recorded nor handed out")
        for i in intents:
            self.store.forget_intent(i.request_id)
        return revoked, len(intents)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
