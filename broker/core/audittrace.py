"""Reading the audit log for people and SIEMs: accountability traces and OCSF (pure).

``trace`` answers, for one credential or request: what started it, which
workload asked, which class it was and who owns it and who should have
intervened, which scope-map version and rule decided, who approved (or which
rule said no approval was needed), what was minted, every request the credential
served (the one that minted it, then each identical request a sidecar answered
from its cache: ``credential.reused``), and how it ended.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.core.records import parse_time
from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import InvalidSpiffeIdError


@dataclass(slots=True, kw_only=True)
class Trace:
    request_id: str
    decision: dict[str, Any] | None = None
    minted: list[dict[str, Any]] = field(default_factory=list)
    ended: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    reused: list[dict[str, Any]] = field(default_factory=list)  # credential.reused, in order

    def served(self) -> list[dict[str, Any]]:
        """Every request a credential of this trace served: the minting request first, then
        each reuse; ``how`` is minted or reused."""
        out: list[dict[str, Any]] = []
        req = (self.decision or {}).get("request") or {}
        for m in self.minted:
            out.append({"how": "minted", "credential_id": m.get("credential_id"),
                        "time": m.get("time"), "request_id": self.request_id,
                        "initiating_event": req.get("initiating_event"),
                        "justification": req.get("justification") or ""})
            for r in self.reused:
                if r.get("credential_id") == m.get("credential_id"):
                    rreq = r.get("request") or {}
                    out.append({"how": "reused", "credential_id": r.get("credential_id"),
                                "time": r.get("served_at") or r.get("time"),
                                "recorded_at": r.get("time"), "request_id": r.get("request_id"),
                                "initiating_event": rreq.get("initiating_event"),
                                "justification": rreq.get("justification") or ""})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "decision": self.decision,
                "credentials": self.minted, "approvals": self.approvals, "ended": self.ended,
                "served": self.served(), "reused": self.reused}


def trace(records: Iterable[dict[str, Any]], ident: str) -> Trace | None:
    """The accountability chain for a credential id, request id or approval id; None if unknown.

    A credential ends by hand-back or single revocation (``credential.revoked``), by a
    bulk revocation that names it (``credentials.revoked`` with ``credential_ids``), or
    by a freeze matching its identity or class while it was live (Vault refuses it from
    then on; the freeze's own bulk revocation follows). Each ending in ``ended`` carries
    ``how``: handed_back, revoked, frozen or revocation_failed.
    """
    records = list(records)
    request_id = ""
    for r in records:
        if ident in (r.get("request_id"), r.get("credential_id"), r.get("approval_id")):
            # A reuse names the request it served; the trace is of the one that minted.
            request_id = str((r.get("minted_request_id") if r.get("type") ==
                              "credential.reused" else r.get("request_id")) or "")
            if request_id:
                break
    if not request_id:
        return None
    t = Trace(request_id=request_id)
    minted: dict[str, dict[str, Any]] = {}
    for r in records:
        kind = r.get("type", "")
        if r.get("request_id") == request_id:
            if kind == "decision":
                t.decision = r
            elif kind == "credential.minted":
                t.minted.append(r)
                minted[str(r.get("credential_id"))] = r
            elif kind.startswith("approval."):
                t.approvals.append(r)
    freezes: dict[str, dict[str, Any]] = {}
    gone: set[str] = set()  # ended already: a later freeze did not end them again
    reuses: set[str] = set()
    for r in records:
        kind = r.get("type")
        if kind == "credential.reused" and r.get("credential_id") in minted:
            if str(r.get("request_id")) not in reuses:  # a hit reported twice counts once
                reuses.add(str(r.get("request_id")))
                t.reused.append(r)
        elif kind == "credential.revoked" and r.get("credential_id") in minted:
            how = "handed_back" if r.get("selector") == "hand-back" else "revoked"
            t.ended.append({**r, "how": how})
            gone.add(str(r.get("credential_id")))
        elif kind == "credentials.revoked":
            failed = set(r.get("failed_ids") or [])
            ids = r.get("credential_ids") or []
            for cid in ids:
                if cid in minted:
                    t.ended.append(_bulk_end(r, str(cid), len(ids), cid in failed, freezes))
                    if cid not in failed:
                        gone.add(str(cid))
        elif kind == "freeze":
            freezes[str(r.get("freeze_id"))] = r
            for cid, m in minted.items():
                if cid not in gone and _froze(r, m):
                    t.ended.append(_freeze_end(r, m))
                    gone.add(cid)
    if not any("chain" in r for r in records):  # one file: its seq is the order
        t.ended.sort(key=lambda e: (e.get("seq") is None, e.get("seq") or 0))
    return t  # several chains (a database): in the order they were written


def _by(r: dict[str, Any]) -> str:
    """Which broker process recorded ``r`` (records read from a database name their chain)."""
    return f" [recorded by broker {r['chain']}]" if r.get("chain") else ""


_ENDING_KEYS = ("type", "time", "seq", "hash", "by", "reason")


def _ending_keys(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in _ENDING_KEYS} | ({"chain": r["chain"]} if "chain" in r else {})


def _bulk_end(r: dict[str, Any], cid: str, n: int, failed: bool,
              freezes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    selector = str(r.get("selector") or "")
    out = _ending_keys(r)
    out |= {"how": "revocation_failed" if failed else "revoked", "credential_id": cid,
            "selector": selector, "credentials_in_revocation": n,
            "counts": r.get("counts") or {}}
    if selector.startswith("freeze "):
        freeze_id = selector.split(" ", 1)[1]
        out["freeze_id"] = freeze_id
        fz = freezes.get(freeze_id)
        if fz is not None:
            out["freeze"] = {"kind": fz.get("kind"), "pattern": fz.get("pattern")}
    return out


def _froze(fz: dict[str, Any], minted: dict[str, Any]) -> bool:
    """Was this credential live and matched when the freeze was put in force?"""
    try:
        at = parse_time(str(fz.get("time")))
        if not parse_time(str(minted.get("time"))) <= at < parse_time(
                str(minted.get("expires_at"))):
            return False
    except ValueError:
        return False
    if fz.get("kind") == "action_class":
        return bool(fz.get("pattern") == minted.get("action_class"))
    try:
        return SpiffeIdPattern.parse(str(fz.get("pattern"))).matches(
            SpiffeId.parse(str(minted.get("spiffe_id"))))
    except InvalidSpiffeIdError:
        return False


def _freeze_end(fz: dict[str, Any], minted: dict[str, Any]) -> dict[str, Any]:
    return {**_ending_keys(fz), "how": "frozen",
            "credential_id": minted.get("credential_id"), "freeze_id": fz.get("freeze_id"),
            "kind": fz.get("kind"), "pattern": fz.get("pattern"),
            "vault_error": fz.get("vault_error") or ""}


def _ending_line(e: dict[str, Any]) -> str:
    how, when, why = e.get("how"), e.get("time"), e.get("reason")
    if how == "handed_back":
        return f"handed back by the workload at {when}: {why}"
    if how == "frozen":
        what = f"action class {e.get('pattern')}" if e.get("kind") == "action_class" \
            else f"identities matching {e.get('pattern')}"
        enforced = f" (Vault could not enforce it: {e['vault_error']})" \
            if e.get("vault_error") else "; Vault refused it from then on"
        return f"frozen by {e.get('by')} at {when} (freeze {e.get('freeze_id')} of {what})" \
               f"{enforced}: {why}"
    if e.get("type") == "credentials.revoked":
        n = e.get("credentials_in_revocation")
        pending = (e.get("counts") or {}).get("pending")
        note = f"; {pending} of them awaited Vault's confirmation" if pending else ""
        head = "revocation FAILED for it" if how == "revocation_failed" else "revoked"
        return (f"{head} in a bulk revocation by {e.get('by')} at {when} (selector "
                f"{e.get('selector')}; {n} credential(s){note}): {why}")
    return f"revoked by {e.get('by')} (selector {e.get('selector')}) at {when}: {why}"


def _served_line(x: dict[str, Any]) -> str:
    ev = x.get("initiating_event") or {}
    event = f"{ev.get('source')} {ev.get('id')}" if ev else "none"
    if ev.get("summary"):
        event += f" — {ev.get('summary')}"
    how = "minted for" if x["how"] == "minted" else "reused from the sidecar cache for"
    just = x.get("justification") or "none"
    return (f"{x.get('time')} {how} request {x.get('request_id')}; event: {event}; "
            f"justification: {just}")


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
    if d.get("federated_from"):
        lines.append(f"     federated: a workload of the foreign trust domain "
                     f"{d.get('federated_from')} (trusted through SPIFFE federation)")
    if req.get("justification"):
        lines.append(f"     justification: {req.get('justification')}")
    target = f" on target {req.get('target')}" if req.get("target") else ""
    env = d.get("environment") or req.get("environment")
    where = f" in environment {env}" if env else ""
    owner = dec.get("owner") or {}
    lines.append(f"  3. action class: {req.get('action_class')}{target}{where} "
                 f"(risk {dec.get('risk') or '?'})")
    if owner:
        lines.append(f"     owner (answers for the policy): {owner.get('team')} "
                     f"<{owner.get('contact')}>")
    if dec.get("escalation"):
        lines.append(f"     escalation (should intervene): {' → '.join(dec['escalation'])}")
    lines.append(f"  4. decided {str(dec.get('outcome', '?')).upper()} by rule {dec.get('rule')} "
                 f"({dec.get('source') or 'no source'}) under scope map "
                 f"{dec.get('scope_map_version')}{_by(d)}")
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
        vault = (f" in environment {m.get('environment')}'s Vault"
                 if m.get("environment") else "")
        lines.append(f"  6. credential {m.get('credential_id')} minted{vault} at "
                     f"{m.get('time')}, TTL {m.get('ttl_seconds')}s, policies "
                     f"{', '.join(m.get('policies') or [])}, expires {m.get('expires_at')}"
                     f"{_by(m)}")
        served = [x for x in t.served() if x["credential_id"] == m.get("credential_id")]
        if len(served) > 1:
            lines.append(f"     served {len(served)} requests:")
            for x in served:
                lines.append(f"       {_served_line(x)}")
        ends = [e for e in t.ended if e.get("credential_id") == m.get("credential_id")]
        for e in ends:
            lines.append(f"  7. {_ending_line(e)}{_by(e)}")
        if all(e.get("how") == "revocation_failed" for e in ends):
            expires = m.get("expires_at")
            try:
                past = expires is not None and parse_time(str(expires)) <= now
            except ValueError:
                past = False
            why = "its revocation failed" if ends else \
                f"no hand-back or revocation {'recorded' if past else 'yet'}"
            lines.append(f"  7. expired at {expires} ({why})" if past else
                         f"  7. still live until {expires} ({why})")
    return lines


# --- OCSF ---------------------------------------------------------------------
# OCSF 1.1 classes (https://schema.ocsf.io):
#   decision, credential.minted  -> 3003 Authorize Session, activity 1 "Assign Privileges":
#       a workload is granted (or refused) a set of Vault policies for a short session.
#   credential.reused            -> 3003 Authorize Session, activity 99 "Other": a sidecar
#                                   answered an identical request with a cached credential.
#   credential.revoked           -> 3005 User Access Management, activity 2 "Revoke Privileges".
#   credentials.revoked (bulk)   -> 3005 User Access Management, activity 2 "Revoke Privileges".
#   freeze of an identity        -> 3001 Account Change, activity 5 "Disable" (its Vault
#                                   entities are disabled); unfreeze -> activity 2 "Enable".
#   freeze of an action class    -> 3005 User Access Management, activity 2 "Revoke
#                                   Privileges" (the class's Vault policy grants nothing);
#                                   unfreeze -> activity 1 "Assign Privileges".
#   freeze.enforced, freeze.enforcement_pending, unfreeze.failed -> as freeze / unfreeze.
#   scope_map.class_removed      -> 3005 User Access Management, activity 2 "Revoke
#                                   Privileges" (the class's policy grants nothing).
#   approval.*                   -> 3005 User Access Management, activity 99 "Other".
#   broker.*, scope_map.*        -> 6002 Application Lifecycle (3 Start, 4 Stop, 8 Update).
_OCSF: dict[str, tuple[int, int, int, str]] = {
    # type: (category_uid, class_uid, activity_id, activity_name)
    "decision": (3, 3003, 1, "Assign Privileges"),
    "credential.minted": (3, 3003, 1, "Assign Privileges"),
    "credential.reused": (3, 3003, 99, "Other"),
    "credential.revoked": (3, 3005, 2, "Revoke Privileges"),
    "credentials.revoked": (3, 3005, 2, "Revoke Privileges"),
    "freeze/spiffe_id": (3, 3001, 5, "Disable"),
    "unfreeze/spiffe_id": (3, 3001, 2, "Enable"),
    "freeze/action_class": (3, 3005, 2, "Revoke Privileges"),
    "unfreeze/action_class": (3, 3005, 1, "Assign Privileges"),
    # Vault's enforcement of a freeze (or why it is still pending), and a failed unfreeze:
    # the same classes and activities as the freeze itself.
    "freeze.enforced/spiffe_id": (3, 3001, 5, "Disable"),
    "freeze.enforcement_pending/spiffe_id": (3, 3001, 5, "Disable"),
    "unfreeze.failed/spiffe_id": (3, 3001, 2, "Enable"),
    "freeze.enforced/action_class": (3, 3005, 2, "Revoke Privileges"),
    "freeze.enforcement_pending/action_class": (3, 3005, 2, "Revoke Privileges"),
    "unfreeze.failed/action_class": (3, 3005, 1, "Assign Privileges"),
    # A class removed from the map: its credentials lose their privileges.
    "scope_map.class_removed": (3, 3005, 2, "Revoke Privileges"),
    # A revoke, freeze or unfreeze refused (not an administrator, no person, outside the
    # responder groups or the actor's teams): an attempt on access management that failed.
    "responder.refused": (3, 3005, 99, "Other"),
    "vault.drift_corrected": (6, 6002, 8, "Update"),
    "audit.unsigned_tail": (6, 6002, 99, "Other"),
    "broker.started": (6, 6002, 3, "Start"),
    "broker.stopped": (6, 6002, 4, "Stop"),
    "scope_map.loaded": (6, 6002, 8, "Update"),
    "scope_map.rejected": (6, 6002, 8, "Update"),
}


def to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """One audit record as an OCSF 1.1 event (the record itself travels in ``unmapped``)."""
    kind = str(record.get("type", ""))
    key = f"{kind}/{record.get('kind')}" if kind in (
        "freeze", "unfreeze", "freeze.enforced", "freeze.enforcement_pending",
        "unfreeze.failed") else kind
    category, cls, activity, name = _OCSF.get(
        key, (3, 3005, 99, kind) if kind.startswith("approval.") else (6, 6002, 99, kind))
    dec = record.get("decision") or {}
    failed = kind == "scope_map.rejected" or kind.endswith("refused") \
        or dec.get("outcome") == "deny" \
        or bool((record.get("counts") or {}).get("failed")) or bool(record.get("vault_error"))
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
    actor = record.get("by") or record.get("spiffe_id")  # who acted: admin, or the workload
    if actor:
        out["actor"] = {"user": {"uid": actor, "type": "System", "name": actor}}
        if record.get("federated_from"):  # a vendor's workload: its own trust domain
            out["actor"]["user"]["domain"] = record["federated_from"]
    env = record.get("environment") or (record.get("request") or {}).get("environment")
    if env:  # which environment (its own Vault) the act was in
        out["metadata"]["labels"] = [f"environment:{env}"]
    if record.get("vault_error"):
        out["status_detail"] = record["vault_error"]
    policies = record.get("policies") or dec.get("policies")
    if kind in ("freeze", "unfreeze"):
        if record.get("kind") == "spiffe_id":  # the identities whose account is (en|dis)abled
            out["user"] = {"uid": record.get("pattern"), "name": record.get("pattern"),
                           "type": "System"}
        else:
            policies = [f"credbroker-{record.get('pattern')}"]
    if policies:
        out["privileges"] = list(policies)
    return out


def _message(r: dict[str, Any]) -> str:
    kind = r.get("type")
    if kind == "decision":
        d = r.get("decision") or {}
        req = r.get("request") or {}
        fed = (f" (federated trust domain {r.get('federated_from')})"
               if r.get("federated_from") else "")
        env = r.get("environment") or req.get("environment")
        where = f" in {env}" if env else ""
        return (f"{r.get('spiffe_id')}{fed} requested {req.get('action_class')}{where}: "
                f"{d.get('outcome')} by {d.get('rule')}")
    if kind == "credential.minted":
        where = f" in {r.get('environment')}" if r.get("environment") else ""
        return f"credential {r.get('credential_id')} minted{where} for {r.get('spiffe_id')}"
    if kind == "credential.reused":
        return (f"credential {r.get('credential_id')} reused from the sidecar cache for "
                f"{r.get('spiffe_id')} (request {r.get('request_id')})")
    if kind == "credential.revoked":
        where = f" in {r.get('environment')}" if r.get("environment") else ""
        return f"credential {r.get('credential_id')} revoked{where} ({r.get('selector')})"
    if kind == "credentials.revoked":
        counts = r.get("counts") or {}
        return (f"{r.get('by')} revoked {len(r.get('credential_ids') or [])} credential(s) "
                f"selected by {r.get('selector')} (" + ", ".join(
                    f"{k.replace('_', ' ')} {v}" for k, v in counts.items()) +
                f"): {r.get('reason')}")
    if kind in ("freeze", "unfreeze"):
        what = f"action class {r.get('pattern')}" if r.get("kind") == "action_class" \
            else f"identities matching {r.get('pattern')}"
        verb = "froze" if kind == "freeze" else "unfroze"
        return f"{r.get('by')} {verb} {what}: {r.get('reason')}"
    if kind in ("responder.refused", "approval.refused"):
        what = f"{r.get('act')} approval {r.get('approval_id')}" if kind == "approval.refused" \
            else " ".join(str(p) for p in (r.get("act"), r.get("target")) if p)
        return f"{r.get('by')} was refused: {what}: {r.get('error')}"
    return str(kind)
