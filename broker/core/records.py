"""The JSON shape of a recorded request and its decision.

This is the line format of ``credbroker audit export --format jsonl`` for
decision events, and what ``credbroker scope replay`` reads: one JSON object
per line with ``type: "decision"``, the time, the identity, the request and the
decision it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.core.models import CredentialRequest, Decision, InitiatingEvent, Outcome
from broker.core.spiffeid import SpiffeId
from broker.errors import InvalidSpiffeIdError


def rfc3339(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Raises: ValueError if ``text`` is not an RFC 3339 time with a zone."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"time {text!r} has no zone; write e.g. 2026-11-27T12:00:00Z")
    return dt


def request_to_json(req: CredentialRequest) -> dict[str, Any]:
    ev = req.initiating_event
    return {
        "action_class": req.action_class,
        "target": req.target,
        "initiating_event": ({"source": ev.source, "id": ev.id, "summary": ev.summary}
                             if ev else None),
        "justification": req.justification,
        "ttl_seconds": req.ttl_seconds,
        # Only when named: requests of a broker without environments stay as they were.
        **({"environment": req.environment} if req.environment else {}),
    }


def request_from_json(obj: Any, where: str) -> CredentialRequest:
    """Raises: ValueError naming ``where`` and the bad field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: request must be a mapping")
    unknown = set(obj) - {"action_class", "target", "initiating_event", "justification",
                          "ttl_seconds", "environment"}
    if unknown:
        raise ValueError(f"{where}: unknown request field(s) {', '.join(sorted(unknown))}")
    ac = obj.get("action_class")
    if not isinstance(ac, str) or not ac:
        raise ValueError(f"{where}: request.action_class is required")
    ev_obj = obj.get("initiating_event")
    event = None
    if ev_obj is not None:
        if not isinstance(ev_obj, dict) or not ev_obj.get("source") or not ev_obj.get("id"):
            raise ValueError(f"{where}: request.initiating_event needs source and id")
        event = InitiatingEvent(source=str(ev_obj["source"]), id=str(ev_obj["id"]),
                                summary=str(ev_obj.get("summary") or ""))
    ttl = obj.get("ttl_seconds") or 0
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        raise ValueError(f"{where}: request.ttl_seconds must be a non-negative integer")
    env = obj.get("environment") or ""
    if not isinstance(env, str):
        raise ValueError(f"{where}: request.environment must be a string")
    return CredentialRequest(action_class=ac, target=str(obj.get("target") or ""),
                             initiating_event=event,
                             justification=str(obj.get("justification") or ""),
                             ttl_seconds=ttl, environment=env)


def decision_to_json(d: Decision) -> dict[str, Any]:
    return {
        "outcome": d.outcome.value,
        "deny_code": d.deny_code.value if d.deny_code else None,
        "action_class": d.action_class,
        "rule": d.rule,
        "reasons": list(d.reasons),
        "scope_map_version": d.scope_map_version,
        "owner": {"team": d.owner.team, "contact": d.owner.contact} if d.owner else None,
        "escalation": list(d.escalation),
        "source": d.source,
        "risk": d.risk,
        "ttl_seconds": d.ttl_seconds,
        "policies": list(d.policies),
    }


def decision_record(*, time: datetime, request_id: str, spiffe_id: SpiffeId,
                    request: CredentialRequest, decision: Decision) -> dict[str, Any]:
    return {
        "type": "decision",
        "time": rfc3339(time),
        "request_id": request_id,
        "spiffe_id": str(spiffe_id),
        "request": request_to_json(request),
        "decision": decision_to_json(decision),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedDecision:
    time: datetime
    request_id: str
    spiffe_id: SpiffeId
    request: CredentialRequest
    outcome: Outcome
    scope_map_version: str


def parse_decision_record(obj: Any, where: str) -> RecordedDecision | None:
    """A recorded decision, or None for records of other types.

    Raises:
        ValueError: a decision record is malformed; the message names ``where``.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    if obj.get("type") != "decision":
        return None
    try:
        when = parse_time(str(obj.get("time", "")))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:
        sid = SpiffeId.parse(str(obj.get("spiffe_id", "")))
    except InvalidSpiffeIdError as exc:
        raise ValueError(f"{where}: {exc}") from None
    dec = obj.get("decision")
    if not isinstance(dec, dict):
        raise ValueError(f"{where}: decision is missing")
    try:
        outcome = Outcome(dec.get("outcome"))
    except ValueError:
        raise ValueError(f"{where}: decision.outcome must be allow, deny or needs_approval"
                         ) from None
    return RecordedDecision(time=when, request_id=str(obj.get("request_id", "")), spiffe_id=sid,
                            request=request_from_json(obj.get("request"), where),
                            outcome=outcome,
                            scope_map_version=str(dec.get("scope_map_version", "")))
