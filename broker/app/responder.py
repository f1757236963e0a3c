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

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from broker.adapters.audit import AuditTrail
from broker.adapters.environments import Environments, split_entity, tag_entity
from broker.adapters.registry import CredentialRow, CredentialStore
from broker.adapters.vault import VaultAdapter
from broker.app.people import LOGIN_HINT, PersonRequiredError
from broker.core.revocation import Freeze, Selector, freeze_target
from broker.core.scopemap import ActionClass, ScopeMap
from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import CredbrokerError, NotFoundError, VaultUnavailableError
from broker.grpc.observability import Metrics

_log = logging.getLogger("credbroker.responder")


def _actor_field(actor: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"actor": {...}}`` for an audit record, or nothing when the caller gave none."""
    return {"actor": dict(actor)} if actor else {}


@dataclass(frozen=True, slots=True)
class BusEvent:
    """What a sidecar must drop: credential ids, a whole class, everything of identities, or
    (``scope_map_version``: a new map is in force) everything decided under another map."""

    credential_ids: tuple[str, ...] = ()
    action_class: str = ""
    identity_pattern: str = ""
    reason: str = ""
    by: str = ""
    scope_map_version: str = ""


#: ``by`` of a freeze the broker made itself (a scope map ``limits`` rule fired).
AUTO_FREEZE_BY = "credbroker"
#: ``by`` of a freeze a workload made of itself: ``self:<SPIFFE ID>``.
SELF_FREEZE_BY = "self:"


def needs_person_to_lift(fz: Freeze) -> bool:
    """A freeze no person made (the broker's rule, or the workload itself) is lifted only
    by a person: automation must not undo what stopped a runaway agent."""
    return fz.by == AUTO_FREEZE_BY or fz.by.startswith(SELF_FREEZE_BY)


#: A sidecar needs one stream; a few more allow for restarts overlapping.
MAX_STREAMS_PER_IDENTITY = 4


class Subscription:
    """One watching stream: events arrive in an :class:`asyncio.Queue` of its event loop.

    ``None`` in the queue means the bus closed (the broker is stopping).
    """

    __slots__ = ("id", "loop", "queue", "spiffe_id")

    def __init__(self, sub_id: int, spiffe_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = sub_id
        self.spiffe_id = spiffe_id
        self.loop = loop
        self.queue: asyncio.Queue[BusEvent | None] = asyncio.Queue()


def _deliver(batch: list[tuple[Subscription, BusEvent | None]]) -> None:
    for sub, event in batch:
        sub.queue.put_nowait(event)


class RevocationBus:
    """Fan-out of revocation events to every watching sidecar.

    Publishers are threads (responder, reload, the gRPC worker pool); subscribers are
    coroutines awaiting an :class:`asyncio.Queue`, which costs no thread per stream. One
    publish wakes each event loop once (``call_soon_threadsafe`` with the whole batch),
    however many streams it serves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[int, Subscription] = {}
        self._per_identity: dict[str, int] = {}
        self._next = 0
        self._closed = False

    def subscribe(self, spiffe_id: str, loop: asyncio.AbstractEventLoop | None = None
                  ) -> Subscription | None:
        """A new subscription delivered on ``loop`` (default: the running loop), or None when
        ``spiffe_id`` already holds its share of streams (one workload must not take them
        all)."""
        loop = loop or asyncio.get_running_loop()
        with self._lock:
            if self._per_identity.get(spiffe_id, 0) >= MAX_STREAMS_PER_IDENTITY:
                return None
            self._next += 1
            sub = Subscription(self._next, spiffe_id, loop)
            self._subs[sub.id] = sub
            self._per_identity[spiffe_id] = self._per_identity.get(spiffe_id, 0) + 1
            if self._closed:
                sub.queue.put_nowait(None)
            return sub

    def unsubscribe(self, sub_id: int) -> None:
        with self._lock:
            sub = self._subs.pop(sub_id, None)
            if sub is not None:
                left = self._per_identity.get(sub.spiffe_id, 1) - 1
                if left > 0:
                    self._per_identity[sub.spiffe_id] = left
                else:
                    self._per_identity.pop(sub.spiffe_id, None)

    @property
    def streams(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, event: BusEvent, owners: dict[str, str] | None = None) -> None:
        """``owners`` maps credential id -> SPIFFE ID, so each sidecar hears only its own."""
        with self._lock:
            subs = list(self._subs.values())
        pattern = SpiffeIdPattern.parse(event.identity_pattern) if event.identity_pattern \
            else None
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Subscription, BusEvent | None]]] = {}
        matches: dict[str, bool] = {}
        for sub in subs:
            out: BusEvent | None = None
            if event.scope_map_version:
                out = event  # every sidecar: its cache was decided under the old map
            elif event.credential_ids:
                mine = tuple(c for c in event.credential_ids
                             if owners is None or owners.get(c) == sub.spiffe_id)
                if mine:
                    out = BusEvent(credential_ids=mine, reason=event.reason, by=event.by)
            elif event.action_class:
                out = event
            elif pattern is not None:
                hit = matches.get(sub.spiffe_id)
                if hit is None:
                    hit = matches[sub.spiffe_id] = pattern.matches(SpiffeId.parse(sub.spiffe_id))
                if hit:
                    out = event
            if out is not None:
                batches.setdefault(sub.loop, []).append((sub, out))
        self._send(batches)

    @staticmethod
    def _send(batches: dict[asyncio.AbstractEventLoop,
                            list[tuple[Subscription, BusEvent | None]]]) -> None:
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: its streams are gone
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs = list(self._subs.values())
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Subscription, BusEvent | None]]] = {}
        for sub in subs:
            batches.setdefault(sub.loop, []).append((sub, None))
        self._send(batches)


#: An issuance still unresolved after this long is no longer in flight (the mint's
#: timeout is seconds): the reconcile loop resolves it.
STALE_INTENT = timedelta(seconds=30)


@dataclass(frozen=True, slots=True, kw_only=True)
class FreezeResult:
    freeze: Freeze
    credentials_matched: int
    entities_disabled: int
    policy_frozen: bool
    enforced_ms: float
    vault_pending: bool  # in force for issuance; Vault enforcement retried until done
    vault_error: str


@dataclass(slots=True)
class ReconcileReport:
    revoked: int = 0   # orphan tokens found and revoked
    cleared: int = 0   # unfinished issuances Vault holds no token for
    pending: int = 0   # ambiguous issuances not yet resolvable
    error: str = ""    # why this round stopped early (Vault or registry unreachable)


@dataclass(slots=True)
class Outcome:
    credential_id: str
    result: str  # revoked, already_dead, pending, failed
    error: str = ""


class Responder:
    def __init__(self, *, store: CredentialStore, vault: VaultAdapter, audit: AuditTrail,
                 bus: RevocationBus, scope_map: Callable[[], ScopeMap],
                 clock: Callable[[], datetime], workers: int = 16,
                 environments: Environments | None = None) -> None:
        """``vault``: the default environment's Vault; ``environments``: every environment's
        (None: ``vault`` is the only one)."""
        self.store = store
        self.vault = vault
        self.vaults = environments or Environments.single(vault)
        self.audit = audit
        self.bus = bus
        self._scope_map = scope_map
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="revoke")
        self._freezes = store.freezes()
        self._stop = threading.Event()
        self._wake = threading.Event()
        #: Accessors known not to be this broker's (their metadata never changes).
        self._foreign: dict[str, set[str]] = {}  # per environment
        #: Removed classes whose policy is emptied, and the credentials already being ended.
        self._emptied: set[str] = set()
        self._ended: dict[str, set[str]] = {}
        self.last_freeze_revocation: threading.Thread | None = None
        self._freeze_lock = threading.Lock()
        #: Held around every write of a class policy that follows a freeze or unfreeze, and
        #: by whoever syncs policies from frozen_classes() (reload, drift check): a sync can
        #: then never write a frozen state that a freeze or unfreeze has since changed.
        self.class_policy_lock = threading.Lock()
        #: One scan at a time: two would revoke, record and audit the same orphans twice.
        self._reconcile_lock = threading.Lock()
        self.metrics: Metrics | None = None
        #: Set by the server on a shared store: tells the other replicas what was done here
        #: (kind, data), so their sidecars hear it too.
        self.replicate: Callable[[str, dict[str, Any]], None] | None = None
        #: Whether this replica does the background work (the retry and reconcile loops).
        self.is_leader: Callable[[], bool] = lambda: True

    def _replicate(self, kind: str, data: dict[str, Any]) -> None:
        if self.replicate is not None:
            self.replicate(kind, data)

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
            revoked = self.vaults.vault(row.environment).revoke_accessor(row.credential_id,
                                                                         check=check)
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
        except Exception as exc:  # never raises: an unexpected failure is a failed outcome
            _log.exception("credential_id=%s: revocation failed unexpectedly", row.credential_id)
            return Outcome(row.credential_id, "failed", f"unexpected: {type(exc).__name__}")
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
               check: bool = True, actor: Mapping[str, Any] | None = None
               ) -> Iterator[Outcome]:
        """Revoke ``rows`` in parallel; yields each outcome as it completes, then audits.

        ``actor`` (who ``by`` is and how it was proven, :meth:`broker.app.people.Actor.audit`)
        goes into the audit record as ``actor``.
        """
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
            self._announce(outcomes, rows, by=by, reason=reason, selector=selector,
                           actor=actor)

    def revoke_whole(self, rows: list[CredentialRow], *, by: str, reason: str, selector: str,
                     check: bool = True, actor: Mapping[str, Any] | None = None
                     ) -> list[Outcome]:
        """Revoke ``rows``, which must be *every* live credential of each (identity, class)
        among them (a freeze, a class removed): one ``sys/leases/revoke-prefix`` call per
        (identity, class), at Vault's own speed, which also ends any token of theirs minted
        meanwhile. Credentials minted without a lease prefix (before it existed), and those
        of a prefix Vault did not revoke, are revoked one by one (:meth:`revoke`: pending
        and retried when Vault does not answer). Audited like :meth:`revoke`.
        """
        # One prefix per environment's Vault: the same (identity, class) has one in each.
        groups: dict[tuple[str, str], list[CredentialRow]] = {}
        rest: list[CredentialRow] = []
        for r in rows:
            if r.lease_prefix:
                groups.setdefault((r.environment, r.lease_prefix), []).append(r)
            else:
                rest.append(r)

        def one(key: tuple[str, str]) -> tuple[tuple[str, str], str]:
            env, prefix = key
            try:
                self.vaults.vault(env).revoke_prefix(prefix)
                return key, ""
            except CredbrokerError as exc:
                return key, str(exc)
            except Exception as exc:  # never raises: an unexpected failure falls back
                _log.exception("revoke-prefix %s failed unexpectedly", prefix)
                return key, f"unexpected: {type(exc).__name__}"

        outcomes: list[Outcome] = []
        done: list[CredentialRow] = []
        for key, error in self._pool.map(one, list(groups)):
            if error:
                _log.warning("revoke-prefix %s failed (%s): revoking its %d credential(s) "
                             "one by one", key[1], error, len(groups[key]))
                rest.extend(groups[key])
                continue
            done.extend(groups[key])
        if done:
            outcomes = [Outcome(r.credential_id, "revoked") for r in done]
            if self.metrics is not None:
                self.metrics.revocations.labels("revoked").inc(len(done))
            self._record_revoked([r.credential_id for r in done], by, reason, selector)
            self._announce(outcomes, done, by=by, reason=reason, selector=selector,
                           actor=actor, vault_revoke_prefixes=len(groups) - len(
                               {(r.environment, r.lease_prefix) for r in rest
                                if r.lease_prefix}))
        if rest or not done:  # (nothing at all is audited too, as revoke() does)
            outcomes += list(self.revoke(rest, by=by, reason=reason, selector=selector,
                                         check=check, actor=actor))
        return outcomes

    def _record_revoked(self, ids: list[str], by: str, reason: str, selector: str) -> None:
        try:
            self.store.mark_revoked_many(ids, by=by, reason=reason, selector=selector,
                                         at=self._clock())
        except CredbrokerError as exc:  # revoked in Vault; the registry lags, harmlessly
            _log.error("%d revocations confirmed by Vault could not be recorded: %s",
                       len(ids), exc)

    def _announce(self, outcomes: list[Outcome], rows: list[CredentialRow], *, by: str,
                  reason: str, selector: str, actor: Mapping[str, Any] | None = None,
                  **extra: Any) -> None:
        gone = [o.credential_id for o in outcomes if o.result in ("revoked", "already_dead",
                                                                   "pending")]
        owners = {r.credential_id: r.spiffe_id for r in rows}
        envs = {r.credential_id: r.environment for r in rows if r.environment}
        if envs:  # which environment's Vault each was revoked in
            extra = {**extra, "environments": {o.credential_id: envs.get(o.credential_id, "")
                                               for o in outcomes}}
        self.bus.publish(BusEvent(credential_ids=tuple(gone), reason=reason, by=by),
                         owners=owners)
        if gone:
            self._replicate("revoked", {"owners": {c: owners.get(c, "") for c in gone},
                                        "reason": reason, "by": by})
        self.audit.append_or_queue(
            "credentials.revoked", by=by, reason=reason, selector=selector,
            credential_ids=[o.credential_id for o in outcomes],
            counts={k: sum(1 for o in outcomes if o.result == k)
                    for k in ("revoked", "already_dead", "pending", "failed")},
            failed_ids=[o.credential_id for o in outcomes if o.result == "failed"],
            **extra, **_actor_field(actor))

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
        """Until :meth:`close`: enforce freezes Vault missed, retry pending revocations."""
        while not self._stop.wait(interval):
            if not self.is_leader():
                continue
            try:
                self.enforce_pending_freezes()
                self.retry_pending()
            except CredbrokerError as exc:
                _log.warning("retrying pending freezes and revocations failed: %s", exc)
            except Exception:  # the loop must outlive any one failure
                _log.exception("retrying pending freezes and revocations failed unexpectedly")

    # -- freeze

    def freeze(self, *, spiffe_id: str, action_class: str, reason: str, by: str,
               actor: Mapping[str, Any] | None = None, rule: str = "") -> FreezeResult:
        """Freeze: recorded first (in force for issuance when this returns, whatever Vault
        does), pushed to sidecars, then enforced by Vault and the credentials revoked.

        When Vault cannot enforce it now, the result says so (``vault_pending``) and the
        retry loop enforces it as soon as Vault answers; the live credentials' revocations
        stay pending likewise.

        Raises:
            InvalidRequestError: malformed target or missing reason.
            NotFoundError: an unknown action class.
            StoreError: the freeze could not be recorded (then nothing was done).
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
        fz = Freeze(id=uuid.uuid4().hex[:12], kind=kind, pattern=pattern, reason=reason, by=by,
                    created_at=now)
        with self._freeze_lock:
            self.store.add_freeze(fz, entities)  # durable first: new issuance stops here
            try:
                self._freezes = self.store.freezes()
            except CredbrokerError:  # recorded: in force from the registry's next read
                self._freezes = [*self._freezes, fz]
        # Who froze what and why is on record before Vault is asked (which can take long).
        self.audit.append_or_queue("freeze", freeze_id=fz.id, kind=kind, pattern=pattern,
                                   reason=reason, by=by, **({"rule": rule} if rule else {}),
                                   **_actor_field(actor))
        try:
            rows = self.store.live(selector, now)
        except CredbrokerError as exc:  # the leftovers pass revokes them once it can read
            _log.error("freeze %s: cannot list its live credentials yet: %s", fz.id, exc)
            rows = []
        # Sidecars drop what they cache for it now, whatever Vault does next.
        self.bus.publish(BusEvent(action_class=pattern if kind == "action_class" else "",
                                  identity_pattern=pattern if kind == "spiffe_id" else "",
                                  reason=reason, by=by))
        self._replicate("freeze", {"id": fz.id, "kind": kind, "pattern": pattern,
                                   "reason": reason, "by": by})
        enforced, found, error = self._enforce(fz, set(entities))
        enforced_ms = (time.perf_counter() - started) * 1000
        self.audit.append_or_queue(
            "freeze.enforced" if enforced else "freeze.enforcement_pending", freeze_id=fz.id,
            kind=kind, pattern=pattern, by=by, credentials_matched=len(rows),
            vault_entities_disabled=sorted(found) if enforced else [],
            vault_policy_frozen=enforced and kind == "action_class",
            vault_enforced_ms=round(enforced_ms, 3) if enforced else None, vault_error=error)
        if not enforced:
            _log.error("freeze %s of %s %s is in force for issuance, but Vault does not "
                       "enforce it yet (%s); retried until it does", fz.id, kind, pattern, error)
        # Revoking them is hygiene when Vault already refuses them: in bulk, without the
        # per-token look-up (they are live per the registry). Without Vault, they become
        # pending revocations, retried until done.
        # Every live credential of each (identity, class) the freeze matches: one
        # revoke-prefix call per (identity, class).
        self.last_freeze_revocation = threading.Thread(
            target=lambda: self.revoke_whole(rows, by=by, reason=reason,
                                             selector=f"freeze {fz.id}", check=not enforced,
                                             actor=actor),
            name="freeze-revoke", daemon=True)
        self.last_freeze_revocation.start()
        return FreezeResult(freeze=fz, credentials_matched=len(rows),
                            entities_disabled=len(found) if enforced else 0,
                            policy_frozen=enforced and kind == "action_class",
                            enforced_ms=enforced_ms, vault_pending=not enforced,
                            vault_error=error)

    def _enforce(self, fz: Freeze, entities: set[str]) -> tuple[bool, set[str], str]:
        """Make Vault refuse what ``fz`` freezes; record the outcome. Never raises.

        Returns (enforced, entities covered, error).
        """
        errors: list[str] = []

        def attempt(env: str, act: Callable[[], None]) -> None:
            """One Vault's part; a Vault that fails does not keep the others from theirs."""
            where = f"Vault ({env}): " if self.vaults.declared else ""
            try:
                act()
            except CredbrokerError as exc:
                errors.append(f"{where}{exc}")
            except Exception as exc:  # never raises: retried by the loop like any failure
                _log.exception("freeze %s: Vault enforcement failed unexpectedly", fz.id)
                errors.append(f"{where}unexpected: {type(exc).__name__}")

        # In every environment's Vault: a freeze stops the identity or class everywhere.
        if fz.kind == "spiffe_id":
            if "*" not in fz.pattern:
                for env, vault in self.vaults:
                    def find(env: str = env, vault: VaultAdapter = vault) -> None:
                        found = vault.entity_of(fz.pattern)  # also one this registry never saw
                        if found:
                            entities.add(tag_entity(env if self.vaults.declared else "", found))
                    attempt(env, find)
            for tagged in sorted(entities):
                env, eid = split_entity(tagged)

                def disable(env: str = env, eid: str = eid) -> None:
                    self.vaults.vault(env).set_entity_disabled(eid, True)
                attempt(env or self.vaults.default, disable)
        else:
            cls = self._scope_map().classes.get(fz.pattern)
            if cls is not None:  # a class no longer in the map has no policy to freeze
                with self.class_policy_lock:
                    for env, vault in self.vaults:
                        def freeze(vault: VaultAdapter = vault,
                                   cls: ActionClass = cls) -> None:
                            vault.freeze_class_policy(cls)
                        attempt(env, freeze)
        error = "; ".join(errors)
        try:
            self.store.set_freeze_enforcement(fz.id, entity_ids=entities, enforced=not error,
                                              error=error)
        except CredbrokerError as exc:
            _log.error("freeze %s: could not record its Vault enforcement: %s", fz.id, exc)
        return not error, entities, error

    def enforce_pending_freezes(self) -> int:
        """Enforce freezes Vault could not enforce when they were made. Returns how many
        are still not enforced.

        Raises:
            StoreError: the registry could not be read.
        """
        left = 0
        for fz, entities in self.store.unenforced_freezes():
            enforced, found, _ = self._enforce(fz, set(entities))
            if not enforced:
                left += 1
                continue
            self.audit.append_or_queue("freeze.enforced", freeze_id=fz.id, kind=fz.kind,
                                       pattern=fz.pattern, by="credbroker",
                                       vault_entities_disabled=sorted(found),
                                       vault_policy_frozen=fz.kind == "action_class")
            _log.warning("freeze %s of %s %s is now enforced by Vault", fz.id, fz.kind,
                         fz.pattern)
        return left

    def revoke_frozen_leftovers(self, min_age: timedelta = timedelta(minutes=2)) -> int:
        """Live credentials that an active freeze matches (left by a crash during a freeze, or
        minted in a race with one): disable entities the freeze does not cover yet, and
        revoke them. Freezes younger than ``min_age`` are left to their own revocation.
        Returns how many were found. Raises: StoreError.
        """
        now = self._clock()
        found = 0
        for fz, entities in self.store.active_freezes():
            if fz.created_at > now - min_age:
                continue
            selector = Selector.build(spiffe_id=fz.pattern if fz.kind == "spiffe_id" else "",
                                      action_class=fz.pattern if fz.kind == "action_class"
                                      else "")
            rows = [r for r in self.store.live(selector, now) if not r.revoke_pending]
            if not rows:
                continue
            found += len(rows)
            new_entities = {tag_entity(r.environment, r.entity_id) for r in rows
                            if r.entity_id} - set(entities)
            if fz.kind == "spiffe_id" and new_entities:
                self._enforce(fz, set(entities) | new_entities)
            _log.warning("freeze %s: %d live credential(s) it matches are revoked now", fz.id,
                         len(rows))
            list(self.revoke(rows, by=fz.by, reason=fz.reason, selector=f"freeze {fz.id}"))
        return found

    def unfreeze(self, *, spiffe_id: str, action_class: str, reason: str, by: str,
                 actor: Mapping[str, Any] | None = None) -> list[Freeze]:
        """Lift the freezes of exactly this pattern or class: on record first, then Vault
        gives the power back, then the freeze is lifted for issuance.

        A freeze the broker made itself (``by: credbroker``) or a workload made of itself
        (``by: self:<SPIFFE ID>``) is lifted only when ``actor`` is a person.

        Raises:
            InvalidRequestError, NotFoundError (nothing frozen like that), AuditError (not
            on record: nothing lifted), VaultUnavailableError, VaultError (Vault did not give
            the power back: the freeze stays in force, retry), PersonRequiredError (an
            automatic or self freeze, and no person).
        """
        kind, pattern = freeze_target(spiffe_id, action_class)
        active = self.store.active_freezes()
        mine = [(f, es) for f, es in active if f.kind == kind and f.pattern == pattern]
        if not mine:
            raise NotFoundError(f"nothing is frozen as {kind.replace('_', ' ')} {pattern!r}; "
                                "see `credbroker freeze --list`")
        guarded = [f for f, _ in mine if needs_person_to_lift(f)]
        if guarded and (actor or {}).get("kind") != "person":
            raise PersonRequiredError(
                f"{pattern} was frozen by {guarded[0].by} ({guarded[0].reason}); only a person "
                f"may lift that, not {by}: {LOGIN_HINT}")
        # Giving power back is on record first (fail closed: no record, no unfreeze).
        self.audit.append("unfreeze", kind=kind, pattern=pattern, reason=reason, by=by,
                          **_actor_field(actor))
        still = {e for f, es in active if not (f.kind == kind and f.pattern == pattern)
                 for e in es}
        # Held until the freeze is lifted in the registry, so a policy sync (reload, drift
        # check) never sees the class frozen after its policy was given back.
        with self.class_policy_lock:
            try:
                for _, entities in mine:
                    for tagged in entities:
                        if tagged not in still:
                            env, eid = split_entity(tagged)
                            self.vaults.vault(env).set_entity_disabled(eid, False)
                scope_map = self._scope_map()
                if kind == "action_class" and pattern in scope_map.classes:
                    # Given back only where the class may be minted; elsewhere it stays empty.
                    for env, vault in self.vaults:
                        if pattern in self.vaults.scope_map_for(scope_map, env).classes:
                            vault.restore_class_policy(scope_map.classes[pattern])
            except CredbrokerError as exc:
                # Partly given back at most: enforce the freeze again until it is lifted.
                for f, entities in mine:
                    self.store.set_freeze_enforcement(f.id, entity_ids=entities,
                                                      enforced=False, error=str(exc))
                self.audit.append_or_queue("unfreeze.failed", kind=kind, pattern=pattern,
                                           by=by, error=str(exc), **_actor_field(actor))
                raise VaultUnavailableError(
                    f"the freeze of {pattern} stays in force: Vault did not give the power "
                    f"back ({exc}); run unfreeze again once Vault is reachable") from None
            try:
                with self._freeze_lock:
                    lifted = self.store.lift_freezes(kind, pattern, by=by, reason=reason,
                                                     at=self._clock())
                    self._freezes = self.store.freezes()
            except CredbrokerError as exc:
                # Vault gave the power back but the freeze is still recorded: enforce it
                # again (retried) rather than leave it in force for issuance only.
                for f, entities in mine:
                    try:
                        self.store.set_freeze_enforcement(f.id, entity_ids=entities,
                                                          enforced=False, error="unfreeze "
                                                          "could not be recorded")
                    except CredbrokerError:
                        pass
                # The log said "unfreeze": it must also say the freeze stayed in force.
                self.audit.append_or_queue("unfreeze.failed", kind=kind, pattern=pattern,
                                           by=by, error=f"the registry could not record the "
                                           f"lift: {exc}", **_actor_field(actor))
                raise
        self._replicate("unfreeze", {"kind": kind, "pattern": pattern})
        return [f for f, _ in lifted]

    def refresh_freezes(self) -> list[Freeze]:
        """Read the freezes in force from the store again (another replica's included).

        Raises: StoreError (the list in memory stays).
        """
        with self._freeze_lock:  # never overwrite a freeze()'s newer list with an older read
            self._freezes = self.store.freezes()
            return self._freezes

    def frozen_classes(self) -> frozenset[str]:
        """Classes frozen now, as the store says (another replica's freezes included; the
        last list read when the store cannot be asked): what every Vault sync keeps frozen."""
        try:
            self.refresh_freezes()
        except CredbrokerError as exc:
            _log.warning("frozen classes from the last read of the store: %s", exc)
        return frozenset(f.pattern for f in self._freezes if f.kind == "action_class")

    # -- classes removed from the scope map

    def end_removed_classes(self, scope_map: ScopeMap,
                            removed: Iterable[str] = ()) -> list[str]:
        """End the live credentials of classes ``scope_map`` no longer defines.

        ``removed``: classes a reload just dropped (their policy is emptied even when no
        credential of theirs is live: one minted in a race with the reload is then
        powerless too). Their Vault policy is rewritten to grant nothing (every live token
        of the class powerless at once), sidecars drop them, and they are revoked in the
        background (pending and retried when Vault does not answer). Each class and each
        credential is handled once (audited as ``scope_map.class_removed``); later passes
        only pick up what is new. Returns the classes acted on. Never raises.
        """
        try:
            rows = self.store.live(Selector(all=True), self._clock())
        except CredbrokerError as exc:
            _log.error("cannot look for credentials of removed classes: %s", exc)
            return []
        gone = ({r.action_class for r in rows} | set(removed)) - set(scope_map.classes)
        acted: list[str] = []
        for name in sorted(gone):
            handled = self._ended.setdefault(name, set())
            mine = [r for r in rows if r.action_class == name
                    and r.credential_id not in handled]
            emptied = name in self._emptied
            if emptied and not mine:
                continue
            acted.append(name)
            error = ""
            if not emptied:
                try:
                    with self.class_policy_lock:
                        for _, vault in self.vaults:
                            vault.empty_policy(f"credbroker-{name}")
                    self._emptied.add(name)
                except CredbrokerError as exc:
                    error = str(exc)
            handled.update(r.credential_id for r in mine)
            reason = f"action class {name} was removed from the scope map"
            self.audit.append_or_queue("scope_map.class_removed", action_class=name,
                                       scope_map_version=scope_map.version,
                                       credentials_matched=len(mine),
                                       vault_policy_emptied=name in self._emptied,
                                       vault_error=error, by="credbroker")
            self.bus.publish(BusEvent(action_class=name, reason=reason, by="credbroker"))
            _log.warning("%s: %d live credential(s) %s and being revoked", reason, len(mine),
                         "powerless in Vault" if name in self._emptied else
                         f"NOT yet powerless in Vault ({error})")
            if mine:
                threading.Thread(target=lambda rows=mine, reason=reason, name=name,
                                 check=bool(error): self.revoke_whole(
                    rows, by="credbroker", reason=reason,
                    selector=f"class removed {name}", check=check),
                    name="class-removed-revoke", daemon=True).start()
        for name in set(scope_map.classes) & (set(self._ended) | self._emptied):
            self._ended.pop(name, None)  # the class is back (its policy was rewritten)
            self._emptied.discard(name)
        return acted

    # -- reconciling the registry with Vault

    def reconcile(self, *, startup: bool = False, full: bool = False) -> ReconcileReport:
        """Make every live token this broker minted known to the registry and the log.

        Resolves unfinished issuances — intents whose mint's outcome is unknown
        (ambiguous: Vault's answer was lost), older than :data:`STALE_INTENT`, or, at
        ``startup``, all of them (this process minted none) — and, with ``full`` or at
        start-up, also finds tokens of this broker the registry does not know at all.
        A token found for one was never handed to anyone (the agent got an error), so
        it is revoked, recorded in the registry and audited. An intent with no token
        is dropped once it is older than :data:`STALE_INTENT` (the periodic full scan
        still catches a token minted from a request delivered even later).

        Never raises: when Vault or the registry cannot be asked, the work stays for
        the next round and the report says so.
        """
        if startup and getattr(self.store, "shared", False):
            # Other replicas' issuances may be in flight: a full scan, not "all ours, dead".
            startup, full = False, True
        with self._reconcile_lock:  # a direct call waits for the loop's scan, and vice versa
            return self._reconcile(startup=startup, full=full)

    def _reconcile(self, *, startup: bool, full: bool) -> ReconcileReport:
        report = ReconcileReport()
        try:
            now = self._clock()
            intents = self.store.intents()
            stale = [i for i in intents
                     if startup or i.state == "ambiguous"
                     or i.issued_at <= now - STALE_INTENT]
            if not stale and not (full or startup):
                return report
            in_flight = {i.request_id for i in intents} - {i.request_id for i in stale}
            wanted = {i.request_id: i for i in stale}
            known = self.store.known_credential_ids()
            managed: dict[str, dict[str, str]] = {}
            where: dict[str, str] = {}  # accessor -> environment ("" : the one Vault)
            unlisted: dict[str, str] = {}  # environment -> why its Vault was not listed
            for env, vault in self.vaults:
                try:  # one Vault down does not stop the others' reconcile
                    found_here = vault.managed_accessors(
                        self.store.instance_id, skip=known,
                        foreign=self._foreign.setdefault(env, set()))
                except CredbrokerError as exc:
                    unlisted[env] = str(exc)
                    continue
                managed.update(found_here)
                where.update(dict.fromkeys(found_here, env if self.vaults.declared else ""))
            if managed:
                # An issuance may have begun and minted since the registry was read above:
                # every token listed had its intent recorded before Vault listed it, so
                # read again before calling anything an orphan.
                known = self.store.known_credential_ids()
                rows = {i.request_id: i for i in self.store.intents()}
                in_flight = {rid for rid, i in rows.items()
                             if not (startup or i.state == "ambiguous"
                                     or i.issued_at <= now - STALE_INTENT)}
            else:
                rows = {}
            found: set[str] = set()
            for accessor, meta in managed.items():
                rid = meta.get("request_id", "")
                if rid in in_flight or accessor in known:
                    continue  # recorded, or being recorded by its request right now
                try:
                    self._revoke_orphan(accessor, meta, wanted.get(rid) or rows.get(rid),
                                        environment=where.get(accessor, ""))
                except CredbrokerError as exc:  # that Vault went away: next round
                    unlisted.setdefault(where.get(accessor, "") or self.vaults.default,
                                        str(exc))
                    found.add(rid)  # its intent is not "no token": keep it
                    report.pending += 1
                    continue
                found.add(rid)
                report.revoked += 1
            for rid, intent in wanted.items():
                if rid in found:
                    continue
                if (intent.environment or self.vaults.default) in unlisted:
                    report.pending += 1  # its Vault was not asked: it may hold a token
                    continue
                if startup or intent.issued_at <= now - STALE_INTENT:
                    self.store.forget_intent(rid)
                    report.cleared += 1
                else:
                    report.pending += 1
            if unlisted:
                report.error = "; ".join(
                    (f"Vault ({env}): {why}" if self.vaults.declared else why)
                    for env, why in sorted(unlisted.items()))
                _log.warning("reconcile postponed where Vault did not answer: %s",
                             report.error)
        except CredbrokerError as exc:
            report.error = str(exc)
            _log.warning("reconcile with Vault postponed: %s", exc)
        except Exception as exc:  # never raises: the loop must outlive any one failure
            report.error = f"unexpected: {type(exc).__name__}"
            _log.exception("reconcile failed unexpectedly; retried next round")
        return report

    def _revoke_orphan(self, accessor: str, meta: dict[str, str],
                       intent: CredentialRow | None, *, environment: str = "") -> None:
        """A live token of ours the registry does not hold (in ``environment``'s Vault):
        revoke, record, audit.

        Raises: VaultUnavailableError, VaultError (then nothing is recorded: next round).
        """
        rid = meta.get("request_id", "") or f"orphan-{accessor}"
        self.vaults.vault(environment).revoke_accessor(accessor, check=False)
        now = self._clock()
        why = ("minted for an issuance whose outcome was lost (Vault's answer never "
               "arrived, or the broker died); never handed out")
        try:
            if intent is None:
                self.store.record_intent(request_id=rid, spiffe_id=meta.get("spiffe_id", ""),
                                         action_class=meta.get("action_class", ""),
                                         target=meta.get("target", ""), event_source="",
                                         event_id="", at=now, environment=environment)
            self.store.record_minted(request_id=rid, credential_id=accessor, expires_at=now,
                                     entity_id="")
            self.store.mark_revoked(accessor, by="credbroker", reason=why,
                                    selector="reconcile", at=now, pending=False)
        except CredbrokerError as exc:  # revoked in Vault; the registry lags, harmlessly
            _log.error("credential_id=%s revoked but not recorded: %s", accessor, exc)
        self.audit.append_or_queue(
            "credential.revoked", credential_id=accessor, request_id=rid,
            spiffe_id=meta.get("spiffe_id", ""), action_class=meta.get("action_class", ""),
            by="credbroker", selector="reconcile", reason=why,
            **({"environment": environment} if environment else {}))
        _log.warning("request_id=%s credential_id=%s: %s; revoked", rid, accessor, why)

    def reconcile_soon(self) -> None:
        """Wake the reconcile loop (an issuance's outcome was just lost)."""
        self._wake.set()

    def run_reconcile_loop(self, interval: float = 2.0, full_every: float = 60.0) -> None:
        """Resolve ambiguous issuances and orphan tokens until :meth:`close`."""
        last_full = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.is_leader():  # the leader resolves every replica's intents
                continue
            full = time.monotonic() - last_full >= full_every
            report = self.reconcile(full=full)
            if full:  # a class removed while Vault was down: its policy emptied now
                try:
                    self.end_removed_classes(self._scope_map())
                    self.revoke_frozen_leftovers()
                except Exception:  # the loop must outlive any one failure
                    _log.exception("ending removed classes failed; retried next round")
            if full and not report.error:
                last_full = time.monotonic()
            if report.revoked or report.cleared:
                _log.warning("reconcile: %d orphan token(s) revoked, %d unfinished "
                             "issuance(s) without a token cleared", report.revoked,
                             report.cleared)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
