"""The broker's approval desk: pending approvals, their waiters, escalation and expiry.

State changes go through the pure functions of ``broker.core.approvals``; this
module persists them (registry), audits them, wakes waiting sidecars, and calls
the escalation webhook.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from broker.adapters.approvers import ApproverConfig
from broker.adapters.audit import AuditTrail
from broker.adapters.registry import CredentialStore
from broker.core import approvals as ap
from broker.core.models import CredentialRequest
from broker.core.records import rfc3339
from broker.core.scopemap import ActionClass
from broker.core.teams import TeamScopes, check_approval, teams_of
from broker.errors import AuditError, CredbrokerError, OutsideTeamError, TooManyWaitsError
from broker.grpc.observability import Metrics

_log = logging.getLogger("credbroker.approvals")

#: Approval waits (``AwaitApproval``) one workload may hold at once. A wait costs no
#: thread, but one agent must not hold the broker's capacity for everyone else.
MAX_WAITS_PER_IDENTITY = 16


class _Conflict(Exception):
    """The approval changed in the store (another replica) since this desk read it."""


class ApprovalDesk:
    def __init__(self, *, store: CredentialStore, audit: AuditTrail, config: ApproverConfig,
                 clock: Callable[[], datetime], team_scopes: TeamScopes | None = None) -> None:
        self._store = store
        self._audit = audit
        self._cfg = config
        self._clock = clock
        #: Team-scoped approvers (``--team-scope``): they decide only their teams' classes.
        self._team_scopes: TeamScopes = dict(team_scopes or {})
        self._cond = threading.Condition()
        self._items: dict[str, ap.Approval] = {}
        #: Each approval as the store holds it (the text): a change is written only over
        #: what this desk last read, so two replicas never overwrite each other's votes.
        self._stored: dict[str, str] = {}
        for data in store.load_approvals():
            a = ap.approval_from_json(json.loads(data))
            self._items[a.id] = a
            self._stored[a.id] = data
        #: Several replicas share the store: read an approval again before changing it.
        self._shared = bool(getattr(store, "shared", False))
        #: Set by the server on a shared store: tells the other replicas an approval changed.
        self.replicate: Callable[[str, dict[str, Any]], None] | None = None
        #: Whether this replica runs the ticker (escalations and expiries): the leader.
        self.is_leader: Callable[[], bool] = lambda: True
        self._stop = threading.Event()
        #: When the escalation path last heard of a refused break-glass, per (identity, class).
        self._refusals_notified: dict[tuple[str, str], datetime] = {}
        #: Coroutines waiting for an approval to leave PENDING: woken on their own loop.
        self._wait_lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waits: dict[str, int] = {}
        #: Set by the server: break-glass uses and approval latencies are counted there.
        self.metrics: Metrics | None = None

    # -- reading

    def get(self, approval_id: str) -> ap.Approval:
        """Raises: ApprovalNotFoundError. Never blocks (one dict read)."""
        a = self._items.get(approval_id)
        if a is None:
            raise ap.ApprovalNotFoundError(f"no approval {approval_id!r}; "
                                           "`credbroker approvals list` shows pending ones")
        return a

    def pending(self) -> list[ap.Approval]:
        with self._cond:
            return sorted((a for a in self._items.values() if a.state == ap.PENDING),
                          key=lambda a: a.created_at)

    def awaiting_review(self) -> list[ap.Approval]:
        with self._cond:
            return sorted((a for a in self._items.values() if a.state == ap.BREAK_GLASS),
                          key=lambda a: a.created_at)

    # -- changes

    def _save(self, a: ap.Approval, event: str, **fields: Any) -> None:
        """Persist and audit (durably), then wake waiters. Caller holds the lock.

        If the audit record cannot be written, the stored state is put back, so no
        approval state exists without its record.

        Raises: AuditError, StoreError.
        """
        previous = self._items.get(a.id)
        before = self._stored.get(a.id)
        data = json.dumps(a.to_json())
        if not self._store.replace_approval(a.id, a.state, data, previous=before):
            self._reload_locked(a.id)
            raise _Conflict(a.id)
        try:
            self._audit.append(event, approval_id=a.id, request_id=a.request_id,
                               spiffe_id=a.spiffe_id, action_class=a.action_class,
                               state=a.state, **fields)
        except CredbrokerError:
            if previous is not None and before is not None:
                self._store.replace_approval(previous.id, previous.state, before,
                                             previous=data)
            else:
                self._store.delete_approval(a.id)
            raise
        self._items[a.id] = a
        self._stored[a.id] = data
        self._cond.notify_all()
        self._wake(a.id)
        if self.replicate is not None:
            self.replicate("approval", {"id": a.id})

    def reload(self, approval_id: str) -> None:
        """Read ``approval_id`` from the store again (another replica changed it) and wake
        whoever waits for it here. Raises: StoreError."""
        with self._cond:
            self._reload_locked(approval_id)

    def _reload_locked(self, approval_id: str) -> None:
        data = self._store.load_approval(approval_id)
        if data is None or data == self._stored.get(approval_id):
            return
        self._items[approval_id] = ap.approval_from_json(json.loads(data))
        self._stored[approval_id] = data
        self._cond.notify_all()
        self._wake(approval_id)

    def _changing(self, approval_id: str, change: Callable[[], ap.Approval]) -> ap.Approval:
        """``change()`` under the lock, on the store's current state (read again first when
        replicas share it), done again when another replica changed it meanwhile.

        Raises: whatever ``change`` raises; ApprovalError when it keeps conflicting.
        """
        with self._cond:
            for attempt in range(5):
                if self._shared and attempt == 0:
                    self._reload_locked(approval_id)
                try:
                    return change()
                except _Conflict:
                    continue
        raise ap.ApprovalError(f"approval {approval_id} kept changing through other replicas; "
                               "try again")

    def _wake(self, approval_id: str | None) -> None:
        """Wake the coroutines waiting for ``approval_id`` (None: all of them)."""
        with self._wait_lock:
            if approval_id is None:
                waiting = [w for ws in self._waiters.values() for w in ws]
            else:
                waiting = list(self._waiters.get(approval_id, ()))
        for loop, event in waiting:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop is closed
                pass

    def open(self, *, request_id: str, spiffe_id: str, request: CredentialRequest,
             cls: ActionClass) -> ap.Approval:
        assert cls.approval_rule is not None
        a = ap.open_approval(approval_id="apr-" + uuid.uuid4().hex[:16], request_id=request_id,
                             spiffe_id=spiffe_id, request=request, rule=cls.approval_rule,
                             owner_team=cls.owner.team, escalation=cls.escalation,
                             now=self._clock())
        with self._cond:
            self._save(a, "approval.requested", request_hash=a.request_hash,
                       approvers=list(a.approvers), approvals_required=a.approvals_required,
                       expires_at=rfc3339(a.expires_at))
        return a

    def teams_of(self, a: ap.Approval, who: ap.Approver, *, review: bool
                 ) -> frozenset[str] | None:
        """The teams ``who`` decides ``a`` for (None: every team): a bot's SPIFFE ID when
        scoped, else its groups that the approval rule (``review``: the break-glass
        reviewers) names (:func:`broker.core.teams.teams_of`)."""
        rule = (a.break_glass.reviewers if a.break_glass else ()) if review else a.approvers
        return teams_of(self._team_scopes, spiffe_id=who.subject if who.via == "spiffe" else "",
                        groups=[g for g in who.groups if g in rule])

    def _in_team(self, a: ap.Approval, who: ap.Approver, what: str, *, review: bool
                 ) -> dict[str, Any]:
        """The ``teams`` field of the decision's audit record (empty when ``who`` is not
        team-scoped).

        Raises: OutsideTeamError (audited as ``approval.refused`` with who tried) when a
        team-scoped ``who`` is not of the team owning ``a``'s class."""
        teams = self.teams_of(a, who, review=review)
        try:
            check_approval(teams, owner_team=a.owner_team, action_class=a.action_class,
                           what=f"{what} approval {a.id}")
        except OutsideTeamError as exc:
            self._refused(a, who, what, exc, teams)
            raise
        return {} if teams is None else {"teams": sorted(teams)}

    def _refused(self, a: ap.Approval, who: ap.Approver, what: str, exc: Exception,
                 teams: frozenset[str] | None) -> None:
        """Audit and log a refused decision: an approver's
        attempt is an act on the record too (self-approval, not an approver, a second vote,
        too late, another team's class)."""
        try:  # nothing was decided: a record the log cannot take now is logged, not queued
            self._audit.append(
                "approval.refused", approval_id=a.id, request_id=a.request_id,
                spiffe_id=a.spiffe_id, action_class=a.action_class, owner_team=a.owner_team,
                act=what, by=who.subject, approver=who.subject,
                approver_groups=list(who.groups), via=who.via,
                teams=sorted(teams or ()), error=str(exc))
        except AuditError as failed:
            _log.error("a refused %s of approval %s by %s could not be recorded (%s)", what,
                       a.id, who.subject, failed)
        _log.warning("%s refused: %s", who.subject, exc)

    def decide(self, approval_id: str, who: ap.Approver, reason: str, *, approve: bool
               ) -> ap.Approval:
        """Raises: ApprovalError (and its not-found kind), OutsideTeamError (a team-scoped
        approver, another team's class; audited), AuditError."""
        return self._changing(approval_id, lambda: self._decide(approval_id, who, reason,
                                                                approve=approve))

    def _decide(self, approval_id: str, who: ap.Approver, reason: str, *, approve: bool
                ) -> ap.Approval:
        a = self.get(approval_id)
        teams = self._in_team(a, who, "approve" if approve else "deny", review=False)
        now = self._clock()
        try:
            if approve:
                new = ap.approve(a, who, reason, now,
                                 owner_team_may_approve=self._cfg.owner_team_may_approve)
            else:
                new = ap.deny(a, who, reason, now)
        except ap.ApprovalError as exc:
            self._refused(a, who, "approve" if approve else "deny", exc,
                          self.teams_of(a, who, review=False))
            raise
        self._save(new, "approval.approved" if approve else "approval.denied",
                   approver=who.subject, approver_groups=list(who.groups), via=who.via,
                   issuer=who.issuer, reason=reason,
                   approvals_given=len(new.votes), approvals_required=new.approvals_required,
                   **teams)
        if new.state != ap.PENDING and self.metrics is not None:
            took = (now - a.created_at).total_seconds()
            self.metrics.approval_seconds.labels(a.action_class, new.state).observe(took)
            if new.state == ap.APPROVED and took < self._cfg.fast_approval_seconds:
                self.metrics.approvals_fast.labels(a.action_class).inc()
        return new

    def check(self, approval_id: str, spiffe_id: str, request: CredentialRequest
              ) -> ap.Approval:
        """Would :meth:`consume` succeed now? Changes nothing. Raises: ApprovalError."""
        with self._cond:
            if self._shared:  # granted through another replica a moment ago?
                self._reload_locked(approval_id)
            a = self.get(approval_id)
            if a.spiffe_id != spiffe_id:
                raise ap.ApprovalNotFoundError(f"{spiffe_id} has no approval {approval_id!r}")
            ap.use(a, spiffe_id, request, self._clock())
            return a

    def consume(self, approval_id: str, spiffe_id: str, request: CredentialRequest
                ) -> ap.Approval:
        """Use a granted approval for exactly its request, once across all replicas.

        Raises: ApprovalError, AuditError.
        """
        def use() -> ap.Approval:
            a = self.get(approval_id)
            if a.spiffe_id != spiffe_id:
                raise ap.ApprovalNotFoundError(f"{spiffe_id} has no approval {approval_id!r}")
            new = ap.use(a, spiffe_id, request, self._clock())
            self._save(new, "approval.used", approvers=[v.subject for v in new.votes])
            return new

        return self._changing(approval_id, use)

    def attach_credential(self, approval_id: str, credential_id: str) -> None:
        """Note which credential an approval released (informational). Never raises."""
        with self._cond:
            a = self._items.get(approval_id)
            if a is not None:
                new = replace(a, credential_id=credential_id)
                self._items[new.id] = new
                data = json.dumps(new.to_json())
                try:
                    if self._store.replace_approval(new.id, new.state, data,
                                                    previous=self._stored.get(new.id)):
                        self._stored[new.id] = data
                except CredbrokerError as exc:
                    _log.warning("approval %s: could not note credential %s: %s", a.id,
                                 credential_id, exc)

    def break_glass(self, *, request_id: str, spiffe_id: str, request: CredentialRequest,
                    cls: ActionClass) -> ap.Approval:
        """Raises: ApprovalError (not allowed, reason or event missing), AuditError."""
        assert cls.approval_rule is not None
        with self._cond:  # counted and recorded under one lock: no race past the limit
            recent = tuple(a.created_at for a in self._items.values()
                           if a.break_glass_used and a.spiffe_id == spiffe_id
                           and a.action_class == cls.name)
            try:
                a = ap.break_glass_issue(approval_id="bg-" + uuid.uuid4().hex[:16],
                                         request_id=request_id, spiffe_id=spiffe_id,
                                         request=request, rule=cls.approval_rule,
                                         owner_team=cls.owner.team,
                                         escalation=cls.escalation, now=self._clock(),
                                         recent_uses=recent)
            except ap.BreakGlassLimitError as exc:
                self._audit.append_or_queue(
                    "approval.break_glass_refused", request_id=request_id,
                    spiffe_id=spiffe_id, action_class=cls.name, reason=str(exc))
                # The escalation path hears once per window, not once per attempt: an agent
                # looping on break-glass must not flood it.
                key, now = (spiffe_id, cls.name), self._clock()
                last = self._refusals_notified.get(key)
                window = cls.approval_rule.break_glass.limit.window_seconds \
                    if cls.approval_rule.break_glass else 3600
                if last is None or (now - last).total_seconds() >= window:
                    self._refusals_notified[key] = now
                    self._notify_break_glass(spiffe_id, cls, request, refused=str(exc))
                raise
            self._save(a, "approval.break_glass", reason=request.justification,
                       reviewers=list(a.break_glass.reviewers) if a.break_glass else [],
                       max_ttl_seconds=a.break_glass.max_ttl_seconds if a.break_glass else 0,
                       notified=list(cls.escalation))
        if self.metrics is not None:
            self.metrics.break_glass.labels(cls.name).inc()
        self._notify_break_glass(spiffe_id, cls, request, approval_id=a.id)
        _log.warning("BREAK-GLASS: %s used break-glass for %s (%s); awaiting review by %s",
                     spiffe_id, cls.name, request.justification,
                     ", ".join(a.break_glass.reviewers) if a.break_glass else "?")
        return a

    def sign_off(self, approval_id: str, who: ap.Approver, reason: str) -> ap.Approval:
        """Raises: ApprovalError, OutsideTeamError (a team-scoped reviewer, another team's
        class; audited), AuditError."""
        def sign() -> ap.Approval:
            a = self.get(approval_id)
            teams = self._in_team(a, who, "sign off", review=True)
            try:
                new = ap.sign_off(a, who, reason, self._clock())
            except ap.ApprovalError as exc:
                self._refused(a, who, "sign off", exc, self.teams_of(a, who, review=True))
                raise
            self._save(new, "approval.reviewed", reviewer=who.subject, via=who.via,
                       reason=reason, **teams)
            return new

        return self._changing(approval_id, sign)

    async def wait(self, approval_id: str, timeout: float, *, spiffe_id: str) -> ap.Approval:
        """Until the approval is no longer pending, or ``timeout`` seconds pass. Costs no
        thread: an :class:`asyncio.Event` that :meth:`_save` sets from whichever thread
        changed the approval.

        Raises: TooManyWaitsError (``spiffe_id`` already holds MAX_WAITS_PER_IDENTITY waits).
        """
        a = self._items[approval_id]
        if a.state != ap.PENDING or self._stop.is_set() or timeout <= 0:
            return a
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._wait_lock:
            if self._waits.get(spiffe_id, 0) >= MAX_WAITS_PER_IDENTITY:
                raise TooManyWaitsError(
                    f"{spiffe_id} already waits for {MAX_WAITS_PER_IDENTITY} approvals; wait "
                    "for fewer at once (poll without wait_seconds for the others)")
            self._waits[spiffe_id] = self._waits.get(spiffe_id, 0) + 1
        try:
            while True:
                event = asyncio.Event()
                entry = (loop, event)
                with self._wait_lock:  # registered before the state is read: no lost wake-up
                    self._waiters.setdefault(approval_id, []).append(entry)
                try:
                    a = self._items[approval_id]
                    left = deadline - loop.time()
                    if a.state != ap.PENDING or self._stop.is_set() or left <= 0:
                        return a
                    try:
                        await asyncio.wait_for(event.wait(), left)
                    except TimeoutError:
                        return self._items[approval_id]
                finally:
                    with self._wait_lock:
                        waiting = self._waiters.get(approval_id, [])
                        if entry in waiting:
                            waiting.remove(entry)
                        if not waiting:
                            self._waiters.pop(approval_id, None)
        finally:
            with self._wait_lock:
                left_waits = self._waits.get(spiffe_id, 1) - 1
                if left_waits > 0:
                    self._waits[spiffe_id] = left_waits
                else:
                    self._waits.pop(spiffe_id, None)

    # -- time

    def tick_all(self) -> None:
        """Escalate and expire as the clock says. Never raises (failures are logged)."""
        now = self._clock()
        with self._cond:
            for a in list(self._items.values()):
                t = ap.tick(a, now)
                if t.approval is a:
                    continue
                try:
                    if t.expired:
                        self._save(t.approval, "approval.expired",
                                   reason=f"no decision by {rfc3339(a.expires_at)}")
                    elif t.escalate_to:
                        self._save(t.approval, "approval.escalated",
                                   notified=list(t.escalate_to))
                except _Conflict:  # decided through another replica meanwhile: next tick
                    continue
                except Exception as exc:  # the ticker must keep running
                    _log.error("approval %s: could not record %s: %s", a.id,
                               "expiry" if t.expired else "escalation", exc)
                    continue
                for role in t.escalate_to:
                    self._notify(t.approval, role)

    def _notify_break_glass(self, spiffe_id: str, cls: ActionClass, request: CredentialRequest,
                            *, approval_id: str = "", refused: str = "") -> None:
        """Every break-glass use (or refused attempt) goes to the class's escalation path."""
        ev = request.initiating_event
        payload = {"event": "approval.break_glass_refused" if refused
                   else "approval.break_glass", "approval_id": approval_id,
                   "action_class": cls.name, "spiffe_id": spiffe_id,
                   "target": request.target, "justification": request.justification,
                   "initiating_event": {"source": ev.source, "id": ev.id} if ev else None,
                   "notify": list(cls.escalation), "refused": refused}
        _log.warning("BREAK-GLASS %s: %s for %s: notifying %s",
                     "REFUSED" if refused else "used", spiffe_id, cls.name,
                     ", ".join(cls.escalation))
        self._post(payload, approval_id or "break-glass")

    def _notify(self, a: ap.Approval, role: str) -> None:
        payload = {"event": "approval.escalated", "approval_id": a.id, "notify": role,
                   "action_class": a.action_class, "spiffe_id": a.spiffe_id,
                   "target": a.request.target, "approvers": list(a.approvers),
                   "expires_at": rfc3339(a.expires_at),
                   "waiting_since": rfc3339(a.created_at)}
        _log.warning("ESCALATION: approval %s for %s (%s) still pending: notifying %s",
                     a.id, a.action_class, a.spiffe_id, role)
        self._post(payload, a.id)

    def notify_freeze(self, *, event: str, spiffe_id: str, rule: str, reason: str,
                      freeze_id: str, notify: list[str], **context: Any) -> None:
        """An identity frozen without a person (the broker's own rule, or the workload
        itself): the escalation path hears it, with the context. Never raises."""
        payload = {"event": event, "freeze_id": freeze_id, "spiffe_id": spiffe_id,
                   "rule": rule, "reason": reason, "notify": notify, **context}
        _log.warning("FREEZE (%s): %s frozen by rule %s: notifying %s", event, spiffe_id,
                     rule, ", ".join(notify) or "nobody (no escalation path)")
        self._post(payload, f"freeze {freeze_id}")

    def _post(self, payload: dict[str, Any], what: str) -> None:
        """POST ``payload`` to the escalation webhook in the background. Never raises."""
        if not self._cfg.webhook_url:
            return

        def post() -> None:
            req = urllib.request.Request(self._cfg.webhook_url,  # noqa: S310 - configured URL
                                         data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5):  # noqa: S310
                    pass
            except (urllib.error.URLError, OSError) as exc:
                # Only scheme and host: webhook URLs often carry a secret in their path.
                where = urllib.parse.urlsplit(self._cfg.webhook_url)
                _log.error("escalation webhook %s://%s failed for %s: %s",
                           where.scheme, where.hostname, what, type(exc).__name__)

        threading.Thread(target=post, daemon=True, name="escalation-webhook").start()

    def run_ticker(self, interval: float = 1.0) -> None:
        while not self._stop.wait(interval):
            if self.is_leader():  # one replica escalates and expires, not each of them
                self.tick_all()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._wake(None)
