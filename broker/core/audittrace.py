"""Reading the audit log for people and SIEMs: accountability traces and OCSF (pure).

``trace`` answers, for one credential or request: what started it, which
workload asked, which class it was and who owns it and who should have
intervened, which scope-map version and rule decided, who approved (or which
rule said no approval was needed), what was minted, and how it ended.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.core.records import parse_time


@dataclass(slots=True, kw_only=True)
class Trace:
    request_id: str
    decision: dict[str, Any] | None = None
    minted: list[dict[str, Any]] = field(default_factory=list)
    ended: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "decision": self.decision,
                "credentials": self.minted, "approvals": self.approvals, "ended": self.ended}


def trace(records: Iterable[dict[str, Any]], ident: str) -> Trace | None:
    """The accountability chain for a credential id, request id or approval id; None if unknown."""
    records = list(records)
    request_id = ""
    for r in records:
        if ident in (r.get("request_id"), r.get("credential_id"), r.get("approval_id")):
            request_id = str(r.get("request_id") or "")
            if request_id:
                break
    if not request_id:
        return None
    t = Trace(request_id=request_id)
    credential_ids: set[str] = set()
    for r in records:
        kind = r.get("type", "")
        if r.get("request_id") == request_id:
            if kind == "decision":
                t.decision = r
            elif kind == "credential.minted":
                t.minted.append(r)
                credential_ids.add(str(r.get("credential_id")))
            elif kind.startswith("approval."):
                t.approvals.append(r)
    for r in records:
        if r.get("type") == "credential.revoked" and r.get("credential_id") in credential_ids:
            t.ended.append(r)
    return t


def trace_lines(t: Trace, now: datetime) -> list[str]:
    """The trace in plain language, one step per line."""
    lines = [f"Accountability trace for request {t.request_id}"]
    d = t.decision
    if d is None:
        return [*lines, "  no decision record was found for this request"]
    req = d.get("request") or {}
    dec = d.get("decision") or {}
    ev = req.get("initiating_event")
    if ev:
        summary = f" — {ev.get('summary')}" if ev.get("summary") else ""
        lines.append(f"  1. initiating event: {ev.get('source')} {ev.get('id')}{summary}")
    else:
        lines.append("  1. initiating event: none given")
    proof = d.get("proof") or {}
    how = f"X.509-SVID serial {proof.get('x509_serial')}" if proof.get("x509_serial") else "?"
    if proof.get("jwt_id"):
        how += f" and JWT-SVID jti {proof.get('jwt_id')}"
    lines.append(f"  2. requesting workload: {d.get('spiffe_id')} (proven by {how}) at "
                 f"{d.get('time')}")
    if req.get("justification"):
        lines.append(f"     justification: {req.get('justification')}")
    target = f" on target {req.get('target')}" if req.get("target") else ""
    owner = dec.get("owner") or {}
    lines.append(f"  3. action class: {req.get('action_class')}{target} "
                 f"(risk {dec.get('risk') or '?'})")
    if owner:
        lines.append(f"     owner (answers for the policy): {owner.get('team')} "
                     f"<{owner.get('contact')}>")
    if dec.get("escalation"):
        lines.append(f"     escalation (should intervene): {' → '.join(dec['escalation'])}")
    lines.append(f"  4. decided {str(dec.get('outcome', '?')).upper()} by rule {dec.get('rule')} "
                 f"({dec.get('source') or 'no source'}) under scope map "
                 f"{dec.get('scope_map_version')}")
    for reason in dec.get("reasons") or []:
        lines.append(f"     why: {reason}")
    approvers = d.get("approvers") or []
    granted = [a for a in t.approvals if a.get("type") == "approval.approved"]
    if granted or approvers:
        who = ", ".join(str(a.get("approver")) for a in granted) or ", ".join(approvers)
        lines.append(f"  5. approved by: {who}")
    elif dec.get("outcome") == "allow":
        lines.append(f"  5. approval: no approval required by rule {dec.get('rule')} "
                     "(approval: none)")
    else:
        lines.append("  5. approval: none given")
    if not t.minted:
        lines.append("  6. credential: none was issued")
        return lines
    for m in t.minted:
        lines.append(f"  6. credential {m.get('credential_id')} minted at {m.get('time')}, TTL "
                     f"{m.get('ttl_seconds')}s, policies {', '.join(m.get('policies') or [])}, "
                     f"expires {m.get('expires_at')}")
        ends = [e for e in t.ended if e.get("credential_id") == m.get("credential_id")]
        for e in ends:
            how_ended = "handed back by the workload" if e.get("selector") == "hand-back" \
                else f"revoked by {e.get('by')} (selector {e.get('selector')})"
            lines.append(f"  7. {how_ended} at {e.get('time')}: {e.get('reason')}")
        if not ends:
            expires = m.get("expires_at")
            try:
                past = expires is not None and parse_time(str(expires)) <= now
            except ValueError:
                past = False
            lines.append(f"  7. expired at {expires} (no hand-back or revocation recorded)"
                         if past else
                         f"  7. still live until {expires} (no hand-back or revocation yet)")
    return lines


# --- OCSF ---------------------------------------------------------------------
# OCSF 1.1 classes (https://schema.ocsf.io):
#   decision, credential.minted  -> 3003 Authorize Session, activity 1 "Assign Privileges":
#       a workload is granted (or refused) a set of Vault policies for a short session.
#   credential.revoked           -> 3005 User Access Management, activity 2 "Revoke Privileges".
#   approval.*                   -> 3005 User Access Management, activity 99 "Other".
#   broker.*, scope_map.*        -> 6002 Application Lifecycle (3 Start, 4 Stop, 8 Update).
_OCSF: dict[str, tuple[int, int, int, str]] = {
    # type: (category_uid, class_uid, activity_id, activity_name)
    "decision": (3, 3003, 1, "Assign Privileges"),
    "credential.minted": (3, 3003, 1, "Assign Privileges"),
    "credential.revoked": (3, 3005, 2, "Revoke Privileges"),
    "broker.started": (6, 6002, 3, "Start"),
    "broker.stopped": (6, 6002, 4, "Stop"),
    "scope_map.loaded": (6, 6002, 8, "Update"),
    "scope_map.rejected": (6, 6002, 8, "Update"),
}


def to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    kind = str(record.get("type", ""))
    category, cls, activity, name = _OCSF.get(
        kind, (3, 3005, 99, kind) if kind.startswith("approval.") else (6, 6002, 99, kind))
    dec = record.get("decision") or {}
    failed = kind == "scope_map.rejected" or dec.get("outcome") == "deny"
    when = parse_time(str(record.get("time")))
    out: dict[str, Any] = {
        "category_uid": category,
        "class_uid": cls,
        "activity_id": activity,
        "activity_name": name,
        "type_uid": cls * 100 + activity,
        "time": int(when.timestamp() * 1000),
        "severity_id": 3 if failed else 1,
        "status_id": 2 if failed else 1,
        "status": "Failure" if failed else "Success",
        "message": _message(record),
        "metadata": {
            "version": "1.1.0",
            "product": {"name": "credbroker", "vendor_name": "credbroker"},
            "uid": record.get("hash"),
            "sequence": record.get("seq"),
            "correlation_uid": record.get("request_id"),
            "log_name": "credbroker-audit",
        },
        "unmapped": record,
    }
    if record.get("spiffe_id"):
        out["actor"] = {"user": {"uid": record["spiffe_id"], "type": "System",
                                 "name": record["spiffe_id"]}}
    policies = record.get("policies") or dec.get("policies")
    if policies:
        out["privileges"] = list(policies)
    return out


def _message(r: dict[str, Any]) -> str:
    kind = r.get("type")
    if kind == "decision":
        d = r.get("decision") or {}
        req = r.get("request") or {}
        return (f"{r.get('spiffe_id')} requested {req.get('action_class')}: "
                f"{d.get('outcome')} by {d.get('rule')}")
    if kind == "credential.minted":
        return f"credential {r.get('credential_id')} minted for {r.get('spiffe_id')}"
    if kind == "credential.revoked":
        return f"credential {r.get('credential_id')} revoked ({r.get('selector')})"
    return str(kind)
