"""JIT approval: a pending approval bound to one exact request (pure state machine).

An approval is created when the scope map says a request needs one. It is
bound to a hash of everything that matters about the request (identity, class,
target, initiating event, justification, TTL), so it can only ever release a
credential for that exact request, and only once. Time is passed in; ``tick``
escalates to the next role of the class's escalation path after
``escalate_after`` and denies at ``expires``.

Separation of duties: the requesting workload cannot approve its own request,
nobody approves twice, approvers must belong to one of the rule's approver
groups, and (if configured) members of the class owner's team cannot approve
their own agents' requests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from broker.core.models import CredentialRequest
from broker.core.records import parse_time, request_from_json, request_to_json, rfc3339
from broker.core.scopemap import ApprovalRule, BreakGlass
from broker.errors import CredbrokerError

PENDING, APPROVED, DENIED, EXPIRED, USED = "pending", "approved", "denied", "expired", "used"
BREAK_GLASS = "break_glass"  # issued at once; awaiting review
REVIEWED = "reviewed"


class ApprovalError(CredbrokerError):
    """An approval action is not allowed (the message says which rule stops it)."""

    code = "approval_refused"


class ApprovalNotFoundError(ApprovalError):
    code = "unknown_approval"


class BreakGlassLimitError(ApprovalError):
    """Break-glass was used as often as the class's ``break_glass.limit`` allows."""

    code = "break_glass_limited"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Approver:
    subject: str  # the person's OIDC subject (or e-mail), or an approval bot's SPIFFE ID
    groups: tuple[str, ...]
    via: str  # "oidc" or "spiffe"
    issuer: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Vote:
    subject: str
    groups: tuple[str, ...]
    via: str
    reason: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "groups": list(self.groups), "via": self.via,
                "reason": self.reason, "at": rfc3339(self.at)}


def request_hash(spiffe_id: str, request: CredentialRequest) -> str:
    """SHA-256 over the canonical JSON of every bound field of the request."""
    body = {"spiffe_id": spiffe_id, **request_to_json(request)}
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(b"credbroker/approval/v1\x00" + data).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Approval:
    id: str
    request_id: str
    request_hash: str
    spiffe_id: str
    request: CredentialRequest
    action_class: str
    owner_team: str
    escalation: tuple[str, ...]
    approvers: tuple[str, ...]  # groups
    approvals_required: int
    created_at: datetime
    escalate_after: timedelta
    expires_at: datetime
    state: str = PENDING
    votes: tuple[Vote, ...] = ()
    denial: Vote | None = None
    escalated: int = 0  # how many roles of the escalation path were notified
    break_glass: BreakGlass | None = None
    review: Vote | None = None
    credential_id: str = ""

    @property
    def break_glass_used(self) -> bool:
        """This is a break-glass use (awaiting review or reviewed), not an approval."""
        return self.state in (BREAK_GLASS, REVIEWED)

    @property
    def next_escalation_at(self) -> datetime | None:
        if self.escalated >= len(self.escalation):
            return None
        return self.created_at + self.escalate_after * (self.escalated + 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "request_id": self.request_id, "request_hash": self.request_hash,
            "spiffe_id": self.spiffe_id, "request": request_to_json(self.request),
            "action_class": self.action_class, "owner_team": self.owner_team,
            "escalation": list(self.escalation), "approvers": list(self.approvers),
            "approvals_required": self.approvals_required,
            "created_at": rfc3339(self.created_at),
            "escalate_after_seconds": int(self.escalate_after.total_seconds()),
            "expires_at": rfc3339(self.expires_at), "state": self.state,
            "votes": [v.to_json() for v in self.votes],
            "denial": self.denial.to_json() if self.denial else None,
            "escalated": self.escalated,
            "break_glass": ({"allowed": self.break_glass.allowed,
                             "max_ttl_seconds": self.break_glass.max_ttl_seconds,
                             "reviewers": list(self.break_glass.reviewers)}
                            if self.break_glass else None),
            "review": self.review.to_json() if self.review else None,
            "credential_id": self.credential_id,
        }


def _vote(d: dict[str, Any]) -> Vote:
    return Vote(subject=d["subject"], groups=tuple(d["groups"]), via=d["via"],
                reason=d["reason"], at=parse_time(d["at"]))


def approval_from_json(d: dict[str, Any]) -> Approval:
    """Raises: KeyError/ValueError on a malformed stored approval."""
    bg = d.get("break_glass")
    return Approval(
        id=d["id"], request_id=d["request_id"], request_hash=d["request_hash"],
        spiffe_id=d["spiffe_id"], request=request_from_json(d["request"], "stored approval"),
        action_class=d["action_class"], owner_team=d["owner_team"],
        escalation=tuple(d["escalation"]), approvers=tuple(d["approvers"]),
        approvals_required=int(d["approvals_required"]),
        created_at=parse_time(d["created_at"]),
        escalate_after=timedelta(seconds=int(d["escalate_after_seconds"])),
        expires_at=parse_time(d["expires_at"]), state=d["state"],
        votes=tuple(_vote(v) for v in d["votes"]),
        denial=_vote(d["denial"]) if d.get("denial") else None, escalated=int(d["escalated"]),
        break_glass=BreakGlass(allowed=bg["allowed"], max_ttl_seconds=bg["max_ttl_seconds"],
                               reviewers=tuple(bg["reviewers"])) if bg else None,
        review=_vote(d["review"]) if d.get("review") else None,
        credential_id=d.get("credential_id", ""))


def open_approval(*, approval_id: str, request_id: str, spiffe_id: str,
                  request: CredentialRequest, rule: ApprovalRule, owner_team: str,
                  escalation: tuple[str, ...], now: datetime) -> Approval:
    return Approval(
        id=approval_id, request_id=request_id, request_hash=request_hash(spiffe_id, request),
        spiffe_id=spiffe_id, request=request, action_class=request.action_class,
        owner_team=owner_team, escalation=escalation, approvers=rule.approvers,
        approvals_required=rule.approvals_required, created_at=now,
        escalate_after=timedelta(seconds=rule.escalate_after_seconds),
        expires_at=now + timedelta(seconds=rule.expires_seconds), break_glass=rule.break_glass)


def _check_open(a: Approval, now: datetime) -> None:
    if a.state != PENDING:
        raise ApprovalError(f"approval {a.id} is {a.state}, not pending; nothing to decide")
    if now >= a.expires_at:
        raise ApprovalError(f"approval {a.id} expired at {rfc3339(a.expires_at)}")


def _check_person(a: Approval, who: Approver, *, owner_team_may_approve: bool,
                  groups: tuple[str, ...], what: str) -> None:
    if who.subject == a.spiffe_id:
        raise ApprovalError(f"{who.subject} requested this credential and cannot {what} it "
                            "(separation of duties)")
    if not set(who.groups) & set(groups):
        raise ApprovalError(f"{who.subject} is in none of the groups that may {what} "
                            f"{a.action_class} ({', '.join(groups)}); their groups: "
                            f"{', '.join(who.groups) or 'none'}")
    if not owner_team_may_approve and a.owner_team in who.groups:
        raise ApprovalError(f"{who.subject} is in {a.owner_team}, the team that owns "
                            f"{a.action_class}; the owner team may not {what} its own agents' "
                            "requests (configured)")


def approve(a: Approval, who: Approver, reason: str, now: datetime, *,
            owner_team_may_approve: bool = True) -> Approval:
    """Add one approval; the approval is granted when enough have been given.

    Raises:
        ApprovalError: not pending, expired, self-approval, approving twice, not an
            approver, or the owner team where that is not allowed.
    """
    _check_open(a, now)
    if not reason.strip():
        raise ApprovalError("a reason is required: it goes into the audit log")
    _check_person(a, who, owner_team_may_approve=owner_team_may_approve, groups=a.approvers,
                  what="approve")
    if any(v.subject == who.subject for v in a.votes):
        raise ApprovalError(f"{who.subject} already approved {a.id}; another approver is "
                            f"needed ({len(a.votes)} of {a.approvals_required} given)")
    votes = (*a.votes, Vote(subject=who.subject, groups=who.groups, via=who.via, reason=reason,
                            at=now))
    return replace(a, votes=votes,
                   state=APPROVED if len(votes) >= a.approvals_required else PENDING)


def deny(a: Approval, who: Approver, reason: str, now: datetime) -> Approval:
    """Raises: ApprovalError (not pending, expired, not an approver, no reason)."""
    _check_open(a, now)
    if not reason.strip():
        raise ApprovalError("a reason is required: it goes into the audit log")
    _check_person(a, who, owner_team_may_approve=True, groups=a.approvers, what="deny")
    return replace(a, state=DENIED, denial=Vote(subject=who.subject, groups=who.groups,
                                                via=who.via, reason=reason, at=now))


@dataclass(frozen=True, slots=True)
class Tick:
    approval: Approval
    escalate_to: tuple[str, ...] = ()  # roles newly notified
    expired: bool = False


def tick(a: Approval, now: datetime) -> Tick:
    """Escalate or expire a pending approval as time ``now`` requires."""
    if a.state != PENDING:
        return Tick(a)
    if now >= a.expires_at:
        return Tick(replace(a, state=EXPIRED), expired=True)
    notified: list[str] = []
    current = a
    while current.next_escalation_at is not None and now >= current.next_escalation_at:
        notified.append(current.escalation[current.escalated])
        current = replace(current, escalated=current.escalated + 1)
    return Tick(current, escalate_to=tuple(notified))


def use(a: Approval, spiffe_id: str, request: CredentialRequest, now: datetime) -> Approval:
    """Consume a granted approval for exactly the request it was bound to.

    Raises:
        ApprovalError: not approved, already used, expired, or any bound field differs.
    """
    if a.state == USED:
        raise ApprovalError(f"approval {a.id} was already used; an approval releases one "
                            "credential")
    if a.state != APPROVED:
        raise ApprovalError(f"approval {a.id} is {a.state}, not approved")
    if now >= a.expires_at:
        raise ApprovalError(f"approval {a.id} expired at {rfc3339(a.expires_at)}")
    if request_hash(spiffe_id, request) != a.request_hash:
        raise ApprovalError(f"approval {a.id} was given for a different request (identity, "
                            "class, target, initiating event, justification or TTL differ); "
                            "ask for approval of this one")
    return replace(a, state=USED)


def break_glass_issue(*, approval_id: str, request_id: str, spiffe_id: str,
                      request: CredentialRequest, rule: ApprovalRule, owner_team: str,
                      escalation: tuple[str, ...], now: datetime,
                      recent_uses: tuple[datetime, ...] = ()) -> Approval:
    """A break-glass use: allowed only where the rule allows it, with a reason and event,
    and within the rule's limit (``recent_uses``: when this identity broke the glass for
    this class before).

    Raises:
        ApprovalError: the class does not allow break-glass, or reason/event missing.
        BreakGlassLimitError: the identity used break-glass as often as the limit allows.
    """
    bg = rule.break_glass
    if bg is None or not bg.allowed:
        raise ApprovalError(f"{request.action_class} does not allow break-glass; ask for "
                            "approval instead")
    if not request.justification.strip() or request.initiating_event is None:
        raise ApprovalError("break-glass needs a justification and an initiating event")
    window = timedelta(seconds=bg.limit.window_seconds)
    used = sorted(t for t in recent_uses if t > now - window)
    if len(used) >= bg.limit.count:
        again = used[len(used) - bg.limit.count] + window
        raise BreakGlassLimitError(
            f"{spiffe_id} already used break-glass for {request.action_class} {len(used)} "
            f"time(s) within the limit's window ({bg.limit.text}); ask for approval instead "
            f"(break-glass possible again at {again.isoformat()})",
            retry_after_seconds=max(1, int((again - now).total_seconds()) + 1))
    a = open_approval(approval_id=approval_id, request_id=request_id, spiffe_id=spiffe_id,
                      request=request, rule=rule, owner_team=owner_team,
                      escalation=escalation, now=now)
    return replace(a, state=BREAK_GLASS)


def sign_off(a: Approval, who: Approver, reason: str, now: datetime) -> Approval:
    """A reviewer signs off a break-glass use. Raises: ApprovalError."""
    if a.state != BREAK_GLASS:
        raise ApprovalError(f"approval {a.id} is {a.state}, not a break-glass use awaiting "
                            "review")
    if not reason.strip():
        raise ApprovalError("a reason is required: it goes into the audit log")
    reviewers = a.break_glass.reviewers if a.break_glass else ()
    _check_person(a, who, owner_team_may_approve=True, groups=reviewers, what="review")
    return replace(a, state=REVIEWED, review=Vote(subject=who.subject, groups=who.groups,
                                                  via=who.via, reason=reason, at=now))


