"""Server-rendered HTML: every value is escaped; no inline script or style (strict CSP)."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.console.sessions import Session
from broker.core.scopemap import ScopeMap

e = html.escape

NAV = (("/overview", "Overview"), ("/approvals", "Approvals"), ("/credentials", "Credentials"),
       ("/freezes", "Freezes"), ("/audit", "Audit"), ("/reviews", "Break-glass reviews"))


def ts(t: object) -> datetime | None:
    if isinstance(t, datetime):
        return t
    if t is None or not getattr(t, "seconds", 0):
        return None
    return t.ToDatetime(tzinfo=UTC)  # type: ignore[attr-defined, no-any-return]


def when(t: object) -> str:
    d = ts(t)
    return d.strftime("%Y-%m-%d %H:%M:%S UTC") if d else "-"


def csrf_field(s: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{e(s.csrf)}">'


def layout(title: str, body: str, session: Session | None, active: str = "") -> str:
    if session is not None:
        links = "".join(f'<a href="{href}"{" class=active" if href == active else ""}>'
                        f"{e(label)}</a>" for href, label in NAV)
        who = (f'<span class="who" data-testid="who">{e(session.person.subject)} '
               f'<small>({e(", ".join(session.person.groups) or "no groups")})</small></span>'
               f'<form method="post" action="/logout" class="inline">{csrf_field(session)}'
               '<button type="submit">Log out</button></form>')
        flash = "".join(f'<p class="flash {e(kind)}" role="status">{e(text)}</p>'
                        for kind, text in session.flash)
        session.flash.clear()
    else:
        links = who = flash = ""
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)} · credbroker console</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="stylesheet" href="/static/console.css">'
            '<script src="/static/console.js" defer></script></head><body>'
            f'<header><strong class="brand">credbroker</strong><nav>{links}</nav>{who}</header>'
            f"<main><h1>{e(title)}</h1>{flash}{body}</main></body></html>")


def message_page(title: str, text: str, session: Session | None, *,
                 back: str = "") -> str:
    link = f'<p><a href="{e(back)}">Back</a></p>' if back else ""
    return layout(title, f'<p class="error" role="alert">{e(text)}</p>{link}', session)


# -- approvals


def may_decide(a: pb.ApprovalInfo, person_subject: str, groups: Sequence[str], *,
               owner_team_cannot_approve: bool, approve: bool) -> str:
    """Why this person may not approve (or deny) ``a``; "" when they may. The console
    checks this on the server before any act (the broker checks it again)."""
    verb = "approve" if approve else "deny"
    if a.state != "pending":
        return f"This request is {a.state}; there is nothing left to decide."
    if person_subject == a.spiffe_id:
        return f"You requested this credential and cannot {verb} it (separation of duties)."
    if not set(groups) & set(a.approvers):
        return (f"You may not {verb} this request: only members of "
                f"{', '.join(a.approvers)} may decide {a.action_class}, and you are in "
                f"{', '.join(groups) or 'no group'}.")
    if approve and any(v.subject == person_subject for v in a.votes):
        return (f"You already approved this request; it needs "
                f"{a.approvals_required - len(a.votes)} more approval(s) from someone else.")
    if approve and owner_team_cannot_approve and a.owner_team in groups:
        return (f"You are in {a.owner_team}, the team that owns {a.action_class}; the owner "
                "team may not approve its own agents' requests.")
    return ""


def _escalation(a: pb.ApprovalInfo, scope_map: ScopeMap | None) -> str:
    if not a.escalation:
        return "none"
    parts = []
    for i, role in enumerate(a.escalation):
        mark = "notified" if i < a.escalated else ("next" if i == a.escalated else "")
        parts.append(f'<li class="{mark}">{e(role)}{f" <small>({mark})</small>" if mark else ""}'
                     "</li>")
    return f'<ol class="escalation">{"".join(parts)}</ol>'


def approval_card(a: pb.ApprovalInfo, s: Session, scope_map: ScopeMap | None, *,
                  owner_team_cannot_approve: bool) -> str:
    r = a.request
    cls = scope_map.classes.get(a.action_class) if scope_map else None
    risk = cls.risk if cls else "unknown"
    rule = (f"{a.action_class}.approval: {a.approvals_required} of "
            f"{', '.join(a.approvers)}" + (f" ({cls.source})" if cls else ""))
    ev = r.initiating_event
    event = (f"{e(ev.source)} <code>{e(ev.id)}</code>" + (f" — {e(ev.summary)}" if ev.summary
                                                          else "")) if ev.id else "none"
    votes = "".join(f"<li>{e(v.subject)}: {e(v.reason)} <small>{when(v.at)}</small></li>"
                    for v in a.votes) or "<li>none yet</li>"
    ttl = f"{r.ttl_seconds} s" if r.ttl_seconds else "the class's default"
    expires = ts(a.expires_at)
    left = (f'<span class="countdown" data-expires="{expires.isoformat()}">'
            f"{max(0, int((expires - datetime.now(UTC)).total_seconds()))} s</span>"
            if expires else "-")
    why_not = may_decide(a, s.person.subject, s.person.groups,
                         owner_team_cannot_approve=owner_team_cannot_approve, approve=True)
    why_not_deny = may_decide(a, s.person.subject, s.person.groups,
                              owner_team_cannot_approve=owner_team_cannot_approve,
                              approve=False)
    if why_not and why_not_deny:
        act = f'<p class="cannot" data-testid="cannot-approve">{e(why_not)}</p>'
    else:
        buttons = ""
        if not why_not:
            buttons += ('<button type="submit" name="decision" value="approve" '
                        'class="approve">Approve</button>')
        if not why_not_deny:
            buttons += ('<button type="submit" name="decision" value="deny" '
                        'class="deny">Deny</button>')
        note = f'<p class="cannot">{e(why_not)}</p>' if why_not else ""
        act = (f'{note}<form method="post" action="/approvals/{e(a.id)}/decide" '
               f'class="decide">{csrf_field(s)}'
               f'<label>Reason (required, recorded in the audit log)<textarea name="reason" '
               f'required maxlength="1000" data-keep="{e(a.id)}"></textarea></label>'
               f"{buttons}</form>")
    return (f'<article class="approval risk-{e(risk)}" id="approval-{e(a.id)}" '
            f'data-testid="approval" data-id="{e(a.id)}">'
            f"<h2>{e(a.action_class)} <span class=\"badge\">{e(risk)}</span> "
            f"<small>{e(a.id)}</small></h2><dl>"
            f"<dt>Agent</dt><dd><code>{e(a.spiffe_id)}</code></dd>"
            f"<dt>Target</dt><dd>{e(r.target) or 'none'}</dd>"
            f"<dt>Initiating event</dt><dd>{event}</dd>"
            f"<dt>Justification</dt><dd>{e(r.justification) or 'none'}</dd>"
            f"<dt>Requested TTL</dt><dd>{e(ttl)}</dd>"
            f"<dt>Rule</dt><dd>{e(rule)}</dd>"
            f"<dt>Owner</dt><dd>{e(a.owner_team)}</dd>"
            f"<dt>Escalation</dt><dd>{_escalation(a, scope_map)}</dd>"
            f"<dt>Requested</dt><dd>{when(a.created_at)}</dd>"
            f"<dt>Time left</dt><dd>{left}</dd>"
            f"<dt>Request hash</dt><dd><code class=\"hash\">{e(a.request_hash)}</code></dd>"
            f"<dt>Approvals</dt><dd>{len(a.votes)} of {a.approvals_required}<ul>{votes}</ul>"
            f"</dd></dl>{act}</article>")


def approvals_list(items: Iterable[pb.ApprovalInfo], s: Session, scope_map: ScopeMap | None,
                   *, owner_team_cannot_approve: bool) -> str:
    items = sorted(items, key=lambda a: (a.created_at.seconds, a.created_at.nanos),
                   reverse=True)
    if not items:
        return '<p class="empty" data-testid="no-approvals">No request is waiting for approval.</p>'
    return "".join(approval_card(a, s, scope_map,
                                 owner_team_cannot_approve=owner_team_cannot_approve)
                   for a in items)


def approvals_page(fragment: str, s: Session) -> str:
    body = ('<p class="live">Updates live. <span id="live-status" data-testid="live-status">'
            "connecting…</span></p>"
            f'<section id="approvals-live" data-src="/approvals/list">{fragment}</section>')
    return layout("Pending approvals", body, s, "/approvals")


# -- credentials


def counts_table(title: str, counter: Counter[str]) -> str:
    rows = "".join(f"<tr><td><code>{e(k)}</code></td><td>{n}</td></tr>"
                   for k, n in counter.most_common())
    return (f'<table class="counts"><caption>{e(title)}</caption>'
            f"<tr><th>{e(title.split()[-1])}</th><th>live</th></tr>{rows}</table>")


def credential_rows(creds: Sequence[pb.CredentialInfo], *, selectable: bool) -> str:
    """The live-credentials table; an environment column when any credential carries one
    (a broker that declares environments: production and sandbox each their own Vault)."""
    envs = any(c.environment for c in creds)
    out = []
    for c in creds:
        ev = c.initiating_event
        pick = (f'<td><input type="checkbox" name="credential_id" value="{e(c.credential_id)}" '
                f'aria-label="select {e(c.credential_id)}"></td>') if selectable else ""
        one = (f'<td><button type="submit" name="only" value="{e(c.credential_id)}">'
               "Revoke…</button> "
               f'<a href="/freezes?spiffe_id={e(c.spiffe_id)}">Freeze agent…</a></td>'
               ) if selectable else ""
        env = f'<td data-testid="environment">{e(c.environment)}</td>' if envs else ""
        out.append(f'<tr data-testid="credential">{pick}<td><code>{e(c.credential_id)}</code>'
                   f"</td><td><code>{e(c.spiffe_id)}</code></td><td>{e(c.action_class)}</td>"
                   f"{env}<td>{e(c.target)}</td><td>{e(ev.source)} {e(ev.id)}</td>"
                   f"<td>{when(c.issued_at)}</td><td>{when(c.expires_at)}</td>"
                   f"<td>{e(c.state)}</td>{one}</tr>")
    head = ("<tr>" + ('<th><input type="checkbox" id="select-all" aria-label="select all">'
                      "</th>" if selectable else "")
            + "<th>credential</th><th>identity</th><th>action class</th>"
            + ("<th>environment</th>" if envs else "")
            + "<th>target</th><th>initiating event</th><th>issued</th><th>expires</th>"
              "<th>state</th>"
            + ("<th></th>" if selectable else "") + "</tr>")
    return f'<table class="creds">{head}{"".join(out)}</table>'


def preview_table(creds: Sequence[pb.CredentialInfo]) -> str:
    """The CLI's preview: live credentials grouped by identity and class, with counts."""
    groups = Counter((c.spiffe_id, c.action_class) for c in creds)
    rows = "".join(f"<tr><td><code>{e(sid)}</code></td><td>{e(cls)}</td><td>{n}</td></tr>"
                   for (sid, cls), n in sorted(groups.items()))
    return (f'<table class="preview"><tr><th>identity</th><th>action class</th><th>count</th>'
            f"</tr>{rows}</table>")
