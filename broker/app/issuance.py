"""The issuance use case: decide, get approval, mint, record — or leave nothing behind.

:meth:`Issuer.issue` takes who is calling and what it asks for, and returns
:class:`Issued` or :class:`PendingApproval`, or raises one of ``broker.errors``
(:class:`DeniedByPolicy` carries a deny decision). It knows Vault, the credential
store and the audit log only through the small ports below; the gRPC servicer
(``broker.grpc.service``) only translates messages and errors.

Order of the durable steps, and what undoes each when a later one fails:

1. the decision is recorded in the audit log before anything is minted or answered;
2. the budget slot is counted in the store with the decision (:meth:`StoreBudget.spend`)
   and given back if nothing is issued after all;
3. the mint's intent is recorded before Vault is asked, so a crash or a lost answer
   leaves a trace the reconcile loop resolves;
4. the minted credential is recorded, then audited; if either fails, the credential is
   revoked at once (:meth:`Issuer.revoke_unrecorded`) and the agent gets the error.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from broker.app.approval_desk import ApprovalDesk
from broker.app.budget import StoreBudget
from broker.app.responder import AUTO_FREEZE_BY, SELF_FREEZE_BY, FreezeResult, Responder
from broker.core import approvals as ap
from broker.core.approvals import ApprovalError
from broker.core.limits import Trip, counts_as_denial, denial_trip, exceed_trip
from broker.core.models import Caller, CredentialRequest, Decision, MintedToken, Outcome
from broker.core.records import decision_record, rfc3339
from broker.core.revocation import Freeze, first_freeze
from broker.core.scopemap import ActionClass, ScopeMap, evaluate
from broker.core.spiffeid import SpiffeId
from broker.errors import (
    CredbrokerError,
    FrozenError,
    VaultPermissionError,
    VaultUnavailableError,
)
from broker.grpc.observability import Metrics

_log = logging.getLogger("credbroker.broker")


class VaultPort(Protocol):
    """What issuance needs from Vault (``broker.adapters.vault.VaultAdapter``)."""

    def mint(self, *, cls: ActionClass, spiffe_id: SpiffeId, ttl_seconds: int,
             metadata: Mapping[str, str], now: datetime) -> MintedToken: ...

    def revoke_accessor(self, accessor: str, *, check: bool = True) -> bool: ...


class VaultsPort(Protocol):
    """The Vault of each environment (``broker.adapters.environments.Environments``)."""

    def resolve(self, name: str) -> str: ...

    def vault(self, name: str) -> VaultPort: ...


class StorePort(Protocol):
    """What issuance needs from the credential store (``broker.adapters.registry``)."""

    instance_id: str

    def record_intent(self, *, request_id: str, spiffe_id: str, action_class: str, target: str,
                      event_source: str, event_id: str, at: datetime,
                      environment: str = "") -> None: ...

    def record_minted(self, *, request_id: str, credential_id: str, expires_at: datetime,
                      entity_id: str, lease_prefix: str = "") -> None: ...

    def forget_intent(self, request_id: str) -> None: ...

    def mark_ambiguous(self, request_id: str) -> None: ...

    def mark_revoked(self, credential_id: str, *, by: str, reason: str, selector: str,
                     at: datetime, pending: bool, error: str = "") -> None: ...


class AuditPort(Protocol):
    """What issuance needs from the audit log (``broker.adapters.audit.AuditLog``, or
    ``broker.adapters.audit_pg.PostgresAuditLog``)."""

    def append(self, event: str, **fields: Any) -> object: ...

    def append_or_queue(self, event: str, **fields: Any) -> object: ...


class MapSource(Protocol):
    """The scope map in force, and whether Vault holds it yet."""

    @property
    def current(self) -> ScopeMap: ...

    @property
    def vault_synced(self) -> bool: ...


class DeniedByPolicy(Exception):
    """Carries a deny Decision to the boundary, which answers with it."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.deny_code.value if decision.deny_code else "denied")
        self.decision = decision


@dataclass(frozen=True, slots=True, kw_only=True)
class Issued:
    """A credential was minted, recorded and audited; the agent may have it."""

    decision: Decision
    credential: MintedToken
    approval: ap.Approval | None = None
    #: The environment whose Vault minted it ("" for a broker that declares none).
    environment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingApproval:
    """The class needs a person's approval: nothing was minted; ask again with its id."""

    decision: Decision
    approval: ap.Approval


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfFreeze:
    """What :meth:`Issuer.freeze_self` did: a new freeze, or the one already in force."""

    result: FreezeResult | None
    existing: Freeze | None = None


class DenialCounter:
    """Recent denial times per (identity, class), for ``limits.denials``. In memory (a
    restart forgets them); only classes of the map are counted (bounded keys)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: dict[tuple[str, str], deque[datetime]] = {}

    def add(self, key: tuple[str, str], now: datetime, window: timedelta) -> tuple[datetime, ...]:
        """Count a denial at ``now``; the denials of ``key`` within ``window``."""
        with self._lock:
            times = self._times.setdefault(key, deque())
            times.append(now)
            while times and times[0] <= now - window:
                times.popleft()
            return tuple(times)

    def clear(self, spiffe_id: str) -> None:
        """Forget an identity's denials (it was frozen: a lifted freeze starts afresh)."""
        with self._lock:
            for key in [k for k in self._times if k[0] == spiffe_id]:
                del self._times[key]


class Issuer:
    """The issuance use case. Thread-safe; blocking (run it in the broker's executor)."""

    def __init__(self, *, scope_maps: MapSource, vaults: VaultsPort, store: StorePort,
                 budget: StoreBudget, audit: AuditPort, responder: Responder,
                 desk: ApprovalDesk, clock: Callable[[], datetime],
                 metrics: Metrics, write_workers: int = 16) -> None:
        self._maps = scope_maps
        self._vaults = vaults
        self._store = store
        self._budget = budget
        self._audit = audit
        self._responder = responder
        self._desk = desk
        self._clock = clock
        self._metrics = metrics
        self._denials = DenialCounter()
        #: One freeze per identity at a time (two requests tripping at once; a self-freeze).
        self._freeze_lock = threading.Lock()
        #: Audit appends that run while the registry is written (each waits on an fsync).
        self._writes = ThreadPoolExecutor(max_workers=write_workers,
                                          thread_name_prefix="broker-audit")

    def close(self) -> None:
        """Finish the audit writes under way and stop their threads (a write asked for
        later runs in its caller's thread)."""
        self._writes.shutdown(wait=True)

    def _background(self, fn: Callable[..., object], *args: Any, **kwargs: Any
                    ) -> Future[object]:
        """``fn`` in the write pool, so the caller can write its other medium meanwhile;
        in the caller's thread once the pool is shut down (the broker stopping while an
        issuance is under way). The future holds the outcome; nothing is raised here."""
        try:
            return self._writes.submit(fn, *args, **kwargs)
        except RuntimeError:  # shut down: write inline rather than lose the write
            done: Future[object] = Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except Exception as exc:
                done.set_exception(exc)
            return done

    def issue(self, caller: Caller, req: CredentialRequest, request_id: str, *,
              approval_id: str = "", break_glass: bool = False) -> Issued | PendingApproval:
        """Decide ``req`` for ``caller`` under the scope map and freezes in force now, and
        mint when the decision (and an approval, when one is needed) allows it.

        Raises:
            DeniedByPolicy: the scope map denies it (the decision says why).
            ApprovalError: the approval named is not usable for this request.
            FrozenError: a freeze made while minting; the credential was revoked.
            AuditError, StoreError: a record could not be made durable (nothing issued).
            VaultUnavailableError, VaultError: Vault did not mint.
            UnknownEnvironmentError: the request names an environment the broker does not
                declare (nothing recorded).
        """
        # The environment it is for, as recorded (its default one when it names none).
        req = replace(req, environment=self._vaults.resolve(req.environment))
        scope_map = self._maps.current
        now = self._clock()
        me = str(caller.spiffe_id)
        known = scope_map.classes.get(req.action_class)

        def decide(recent: tuple[datetime, ...]) -> tuple[Decision, bool]:
            d = evaluate(scope_map, caller.spiffe_id, req, now, recent,
                         self._responder.freezes, federated_from=caller.federated_from)
            # Counted before minting: no race past a budget.
            return d, d.outcome is Outcome.ALLOW or (
                d.outcome is Outcome.NEEDS_APPROVAL and bool(approval_id or break_glass))

        # Only a class with a budget holds and counts it (no store transaction otherwise).
        with self._budget.spend((me, req.action_class), now, decide,
                                counted=known is not None and known.budget is not None
                                ) as decision:
            return self._decided(caller, req, request_id, decision, scope_map, now,
                                 approval_id=approval_id, break_glass=break_glass)

    def _decided(self, caller: Caller, req: CredentialRequest, request_id: str,
                 decision: Decision, scope_map: ScopeMap, now: datetime, *,
                 approval_id: str, break_glass: bool) -> Issued | PendingApproval:
        """Everything after the decision; raising gives the budget slot back."""
        me = str(caller.spiffe_id)
        _log.info("request_id=%s spiffe_id=%s action_class=%s%s outcome=%s rule=%s "
                  "scope_map=%s", request_id, me, req.action_class,
                  f" environment={req.environment}" if req.environment else "",
                  decision.outcome.value, decision.rule, scope_map.version[:19])
        # Label values are bounded: unknown classes are counted as one.
        label = req.action_class if req.action_class in scope_map.classes else "(unknown)"
        self._metrics.issuance.labels(label, decision.outcome.value).inc()
        grant = decision.outcome is Outcome.ALLOW or (
            decision.outcome is Outcome.NEEDS_APPROVAL and bool(approval_id or break_glass))
        approval: ap.Approval | None = None
        refused: ApprovalError | None = None
        if grant and approval_id:
            try:  # checked now, used only once the credential exists (below)
                approval = self._desk.check(approval_id, me, req)
            except ApprovalError as exc:
                refused = exc
        record = decision_record(time=now, request_id=request_id,
                                 spiffe_id=caller.spiffe_id, request=req, decision=decision)
        if caller.federated_from:  # the foreign trust domain, for audit and trace
            record["federated_from"] = caller.federated_from
        if req.environment:  # also in the request; here for readers of the log
            record["environment"] = req.environment
        fields: dict[str, Any] = {
            **{k: v for k, v in record.items() if k not in ("type", "time")},
            "proof": {"x509_serial": caller.x509_serial, "jwt_id": caller.jwt_id},
            "approvers": [v.subject for v in approval.votes] if approval else [],
            "approval_id": approval_id, "approval_refused": str(refused) if refused else "",
            "break_glass": bool(break_glass and not approval_id and
                                decision.outcome is Outcome.NEEDS_APPROVAL)}
        # On disk before anything is minted or any answer is given (fail closed). When the
        # decision goes straight to a mint, the record is written while the intent is
        # (two files, one wait); _mint waits for both before asking Vault.
        straight = refused is None and (decision.outcome is Outcome.ALLOW or (
            decision.outcome is Outcome.NEEDS_APPROVAL and approval is not None))
        decision_written: Future[object] | None = None
        if straight:
            decision_written = self._background(self._audit.append, "decision", **fields)
        else:
            self._audit.append("decision", **fields)
        if refused is not None:
            raise refused
        if decision.outcome is Outcome.DENY:
            raise DeniedByPolicy(self._after_denial(caller.spiffe_id, decision, scope_map,
                                                    now, request_id))
        cls = scope_map.classes[decision.action_class]
        ttl = decision.ttl_seconds
        if decision.outcome is Outcome.NEEDS_APPROVAL and approval is None:
            if not break_glass:
                return PendingApproval(decision=decision, approval=self._desk.open(
                    request_id=request_id, spiffe_id=me, request=req, cls=cls))
            approval = self._desk.break_glass(request_id=request_id, spiffe_id=me,
                                              request=req, cls=cls)
            if approval.break_glass is not None:
                ttl = min(ttl, approval.break_glass.max_ttl_seconds)
        minted = self._mint(caller, req, request_id, cls, ttl, scope_map.version, now,
                            decision_written=decision_written)
        if approval_id and approval is not None:
            try:  # an approval releases one credential: whoever uses it second loses
                approval = self._desk.consume(approval_id, me, req)
            except CredbrokerError:
                self.revoke_unrecorded(minted.accessor, request_id,
                                       "its approval could not be used", req.environment)
                raise
        if approval is not None:
            self._desk.attach_credential(approval.id, minted.accessor)
        return Issued(decision=decision, credential=minted, approval=approval,
                      environment=req.environment)

    def _after_denial(self, spiffe_id: SpiffeId, decision: Decision, scope_map: ScopeMap,
                      now: datetime, request_id: str) -> Decision:
        """Count the denial; make the automatic freeze the class's ``limits`` call for (a
        spent budget with ``on_exceed: freeze``, or ``limits.denials`` reached). Returns the
        decision to answer with (saying so when the identity was frozen). Never raises."""
        assert decision.deny_code is not None
        cls = scope_map.classes.get(decision.action_class)
        self._metrics.denials.labels(cls.name if cls else "(unknown)",
                                     decision.deny_code.value).inc()
        if cls is None or not counts_as_denial(decision):
            return decision
        trip = exceed_trip(decision)
        if trip is None and cls.denial_trip is not None:
            times = self._denials.add((str(spiffe_id), cls.name), now,
                                      timedelta(seconds=cls.denial_trip.window_seconds))
            trip = denial_trip(cls, str(spiffe_id), times, now)
        if trip is None:
            return decision
        frozen = self._auto_freeze(spiffe_id, cls, trip, request_id)
        if not frozen:
            return decision
        return replace(decision, reasons=(*decision.reasons,
                                          f"{spiffe_id} is now frozen by the broker (rule "
                                          f"{trip.rule}); only a person may lift it"))

    def _auto_freeze(self, spiffe_id: SpiffeId, cls: ActionClass, trip: Trip,
                     request_id: str) -> bool:
        """Freeze ``spiffe_id`` through the responder (recorded first, pushed to sidecars,
        Vault-enforced, retried when Vault is down), as ``by: credbroker`` with the rule;
        notify the class's escalation path. False when it was not frozen now. Never raises.
        """
        me = str(spiffe_id)
        with self._freeze_lock:
            if any(f.kind == "spiffe_id" and f.pattern == me for f in self._responder.freezes):
                return False  # frozen already (another request tripped it a moment ago)
            try:
                res = self._responder.freeze(
                    spiffe_id=me, action_class="", by=AUTO_FREEZE_BY, rule=trip.rule,
                    reason=f"automatic freeze, rule {trip.rule}: {trip.reason}",
                    actor={"kind": "credbroker", "rule": trip.rule, "request_id": request_id})
            except Exception as exc:  # the denial stands; the next one tries again
                _log.error("request_id=%s automatic freeze of %s (rule %s) failed: %s",
                           request_id, me, trip.rule, exc)
                return False
        self._denials.clear(me)
        self._metrics.automatic_freezes.labels(cls.name, trip.rule.rsplit(".", 1)[-1]).inc()
        _log.warning("request_id=%s %s FROZEN by the broker: rule %s fired (%s); %s",
                     request_id, me, trip.rule, trip.reason,
                     "Vault enforcement PENDING" if res.vault_pending else
                     f"Vault enforced in {res.enforced_ms:.1f} ms")
        self._desk.notify_freeze(event="freeze.automatic", spiffe_id=me, rule=trip.rule,
                                 reason=trip.reason, freeze_id=res.freeze.id,
                                 notify=list(cls.escalation), action_class=cls.name,
                                 owner_team=cls.owner.team, request_id=request_id,
                                 credentials_matched=res.credentials_matched,
                                 vault_pending=res.vault_pending)
        return True

    def freeze_self(self, caller: Caller, reason: str) -> SelfFreeze:
        """The caller freezes exactly its own SPIFFE ID (``by: self:<id>``); a second call
        while that freeze holds changes nothing and returns it.

        Raises: StoreError (nothing was frozen), and what ``Responder.freeze`` raises.
        """
        me = str(caller.spiffe_id)
        by = f"{SELF_FREEZE_BY}{me}"
        with self._freeze_lock:
            mine = next((f for f in self._responder.freezes
                         if f.kind == "spiffe_id" and f.pattern == me and f.by == by), None)
            if mine is not None:  # frozen by itself already: nothing new to record
                return SelfFreeze(result=None, existing=mine)
            res = self._responder.freeze(
                spiffe_id=me, action_class="", reason=reason, by=by, rule="self",
                actor={"kind": "self", "client": me, "x509_serial": caller.x509_serial,
                       "jwt_id": caller.jwt_id})
        self._metrics.self_freezes.inc()
        classes = [c for c in self._maps.current.classes.values()
                   if any(p.matches(caller.spiffe_id) for p in c.workloads)]
        _log.warning("%s FROZE ITSELF (%s): %s", me,
                     "Vault enforcement PENDING" if res.vault_pending else
                     f"Vault enforced in {res.enforced_ms:.1f} ms", reason[:200])
        self._desk.notify_freeze(
            event="freeze.self", spiffe_id=me, rule="self", reason=reason,
            freeze_id=res.freeze.id,
            notify=list(dict.fromkeys(e for c in classes for e in c.escalation)),
            action_classes=[c.name for c in classes],
            credentials_matched=res.credentials_matched, vault_pending=res.vault_pending)
        return SelfFreeze(result=res)

    def _mint(self, caller: Caller, req: CredentialRequest, request_id: str, cls: ActionClass,
              ttl: int, version: str, now: datetime, *,
              decision_written: Future[object] | None = None) -> MintedToken:
        """Intent, mint, record, audit — or nothing left behind. ``decision_written``: the
        decision record's append under way; nothing is minted unless it succeeds.

        Raises: VaultUnavailableError, VaultError, StoreError, AuditError (after revoking),
            FrozenError (frozen meanwhile; after revoking).
        """
        try:
            if not self._maps.vault_synced:
                raise VaultUnavailableError(
                    "the broker has not yet brought Vault in line with its scope map (Vault "
                    "was unreachable at start-up); it retries, try again shortly")
            ev = req.initiating_event
            # Intent first (durable), so a crash after minting leaves a trace to reconcile.
            self._store.record_intent(request_id=request_id,
                                      spiffe_id=str(caller.spiffe_id),
                                      action_class=cls.name, target=req.target,
                                      event_source=ev.source if ev else "",
                                      event_id=ev.id if ev else "",
                                      at=self._clock(),  # its age is the mint's
                                      environment=req.environment)
        finally:
            if decision_written is not None:
                _settle(decision_written)  # its error wins: the decision is not on record
        unrecorded = decision_written.exception() if decision_written is not None else None
        if unrecorded is not None:
            self._store.forget_intent(request_id)
            raise unrecorded
        try:
            # In the environment's own Vault: its token means nothing in any other.
            minted = self._vaults.vault(req.environment).mint(
                cls=cls, spiffe_id=caller.spiffe_id, ttl_seconds=ttl,
                metadata={"request_id": request_id, "target": req.target[:256],
                          "scope_map_version": version,
                          "broker_instance": self._store.instance_id},
                now=now,
            )
        except VaultPermissionError:
            self._store.forget_intent(request_id)  # Vault refused: certainly nothing minted
            raise
        except VaultUnavailableError:
            # Sent, but the answer was lost (cut, 5xx, timeout): a token may exist. Keep the
            # intent; the reconcile loop finds and revokes it, or drops the intent once
            # Vault shows there is none.
            self._store.mark_ambiguous(request_id)
            self._responder.reconcile_soon()
            raise
        except CredbrokerError:
            self._store.forget_intent(request_id)  # Vault refused: nothing minted
            raise
        # The credential's registry row and its audit record, written at the same time.
        minted_written = self._background(
            self._audit.append,
            "credential.minted", request_id=request_id, credential_id=minted.accessor,
            spiffe_id=str(caller.spiffe_id), action_class=cls.name, target=req.target,
            policies=list(minted.policies), ttl_seconds=minted.ttl_seconds,
            expires_at=rfc3339(minted.expires_at), vault_entity_id=minted.entity_id,
            scope_map_version=version,
            **({"federated_from": caller.federated_from} if caller.federated_from else {}),
            **({"environment": req.environment} if req.environment else {}))
        failed: BaseException | None = None
        why = ""
        try:
            self._store.record_minted(request_id=request_id, credential_id=minted.accessor,
                                      expires_at=minted.expires_at, entity_id=minted.entity_id,
                                      lease_prefix=minted.lease_prefix)
        except Exception as exc:  # any failure here: the credential must not live on
            # The intent row stays, so a restart would find and revoke it; do it now.
            failed, why = exc, "the registry could not record it"
        _settle(minted_written)
        if failed is None and minted_written.exception() is not None:
            failed, why = minted_written.exception(), "the audit log could not record it"
        if failed is not None:
            self.revoke_unrecorded(minted.accessor, request_id, why, req.environment)
            raise failed
        # A freeze made while this was minting: it either sees this credential in the
        # registry (its list comes after its record; ours after our record), or we see it.
        frozen = first_freeze(self._responder.freezes, caller.spiffe_id, cls.name)
        if frozen is not None:
            self.revoke_unrecorded(minted.accessor, request_id,
                                   f"frozen while it was minted: {frozen.describe()}",
                                   req.environment)
            raise FrozenError(f"{frozen.describe()}; the credential minted meanwhile was "
                              "revoked")
        _log.info("request_id=%s minted credential_id=%s ttl=%ss policies=%s%s", request_id,
                  minted.accessor, minted.ttl_seconds, ",".join(minted.policies),
                  f" environment={req.environment}" if req.environment else "")
        return minted

    def revoke_unrecorded(self, accessor: str, request_id: str, why: str,
                          environment: str = "") -> None:
        """A minted credential cannot be handed out: kill it now (in ``environment``'s
        Vault, which minted it). Never raises.

        If Vault does not confirm, the revocation stays pending in the registry (retried);
        if even that fails, the intent row makes the next start-up revoke it.
        """
        now = self._clock()
        try:
            self._vaults.vault(environment).revoke_accessor(accessor, check=False)
        except CredbrokerError as exc:
            try:
                self._store.mark_revoked(accessor, by="credbroker", reason=why,
                                         selector="unrecorded", at=now, pending=True,
                                         error=str(exc))
                _log.error("request_id=%s credential_id=%s (%s): Vault did not confirm its "
                           "revocation; the registry retries it where it holds its row, and "
                           "the reconcile scan of Vault finds it otherwise", request_id,
                           accessor, why)
            except CredbrokerError as store_exc:
                _log.critical("request_id=%s credential_id=%s (%s) could not be revoked (%s) "
                              "nor queued (%s): revoke it by hand", request_id, accessor, why,
                              exc, store_exc)
            return
        try:
            self._store.mark_revoked(accessor, by="credbroker", reason=why,
                                     selector="unrecorded", at=now, pending=False)
        except CredbrokerError as exc:
            _log.warning("credential_id=%s revoked, but the registry did not record it: %s",
                         accessor, exc)
        self._audit.append_or_queue("credential.revoked", credential_id=accessor,
                                    request_id=request_id, by="credbroker",
                                    selector="unrecorded", reason=why,
                                    **({"environment": environment} if environment else {}))
        _log.error("request_id=%s credential_id=%s revoked: %s", request_id, accessor, why)



def _settle(f: Future[object]) -> None:
    """Wait for ``f`` to finish, whatever its outcome (read it with ``f.exception()``)."""
    wait([f])
