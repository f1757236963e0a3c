"""Typed answers of the sidecar: :class:`Credential`, :class:`PendingApproval`,
:class:`Decision` (frozen dataclasses). A credential's token is never in its ``repr``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def _time(value: Any) -> datetime:
    text = str(value or "")
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The scope map's decision on a request (who answers for it, by which rule)."""

    outcome: str  # allow | deny | needs_approval
    action_class: str
    rule: str
    reasons: tuple[str, ...]
    owner_team: str
    owner_contact: str
    escalation: tuple[str, ...]
    scope_map_version: str
    source: str
    risk: str
    spiffe_id: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Decision:
        owner = d.get("owner") or {}
        return cls(outcome=str(d.get("outcome", "")), action_class=str(d.get("action_class", "")),
                   rule=str(d.get("rule", "")), reasons=_strs(d.get("reasons")),
                   owner_team=str(owner.get("team", "")),
                   owner_contact=str(owner.get("contact", "")),
                   escalation=_strs(d.get("escalation")),
                   scope_map_version=str(d.get("scope_map_version", "")),
                   source=str(d.get("source", "")), risk=str(d.get("risk", "")),
                   spiffe_id=str(d.get("spiffe_id", "")))


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingApproval:
    """``202``: the request waits for a person's approval (``approval_id``)."""

    approval_id: str
    status: str
    action_class: str
    approvers: tuple[str, ...]
    approvals_required: int
    approved_by: tuple[str, ...]
    expires_at: datetime
    poll: str
    request_id: str
    decision: Decision | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PendingApproval:
        dec = d.get("decision")
        return cls(approval_id=str(d.get("approval_id", "")), status=str(d.get("status", "")),
                   action_class=str(d.get("action_class", "")),
                   approvers=_strs(d.get("approvers")),
                   approvals_required=int(d.get("approvals_required") or 0),
                   approved_by=_strs(d.get("approved_by")), expires_at=_time(d.get("expires_at")),
                   poll=str(d.get("poll", "")), request_id=str(d.get("request_id", "")),
                   decision=Decision.from_json(dec) if isinstance(dec, dict) else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """``200``: a minutes-long Vault/OpenBao token for one action class.

    ``token`` is the secret (use it as ``X-Vault-Token``); it is left out of ``repr`` and
    ``str``. ``credential_id`` (the token's accessor) is safe to log.
    """

    credential_id: str
    token: str = field(repr=False)
    expires_at: datetime
    ttl_seconds: int
    action_class: str
    policies: tuple[str, ...]
    request_id: str
    decision: Decision | None
    cached: bool = False
    minted_request_id: str | None = None
    approved_by: tuple[str, ...] = ()
    approval_id: str | None = None
    #: The environment whose Vault minted it (None: the broker declares none).
    environment: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Credential:
        dec = d.get("decision")
        raw = d.get("approval")
        approval: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return cls(credential_id=str(d["credential_id"]), token=str(d["token"]),
                   expires_at=_time(d.get("expires_at")),
                   ttl_seconds=int(d.get("ttl_seconds") or 0),
                   action_class=str(d.get("action_class", "")), policies=_strs(d.get("policies")),
                   request_id=str(d.get("request_id", "")),
                   decision=Decision.from_json(dec) if isinstance(dec, dict) else None,
                   cached=bool(d.get("cached", False)),
                   minted_request_id=d.get("minted_request_id"),
                   approved_by=_strs(approval.get("approved_by")),
                   approval_id=approval.get("approval_id"),
                   environment=d.get("environment"))

    def seconds_left(self, now: datetime | None = None) -> float:
        return (self.expires_at - (now or datetime.now(UTC))).total_seconds()


@dataclass(frozen=True, slots=True, kw_only=True)
class HandBack:
    """The answer to a hand-back (``DELETE``): ``revoked`` now, or ``already_dead``."""

    credential_id: str
    revoked: bool
    already_dead: bool


@dataclass(frozen=True, slots=True)
class InitiatingEvent:
    """What made the agent act: e.g. ``InitiatingEvent("splunk", "NOTABLE-4242")``."""

    source: str
    id: str
    summary: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"source": self.source, "id": self.id}
        if self.summary:
            out["summary"] = self.summary
        return out
