"""Audit search and trace with a verification badge, break-glass reviews, the overview."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.adapters.audit import head_path_of, read_checkpoints, read_head, read_records
from broker.cli.audit import _public_key
from broker.console import app as console_app
from broker.console import views
from broker.console.brokerapi import BrokerRefused
from broker.core.auditchain import verify_chain
from broker.core.auditreport import _bar_chart, build_report
from broker.core.audittrace import trace, trace_lines
from broker.errors import CredbrokerError

e = views.e


def verify_now(log: Path, public_key: Path | None) -> dict[str, Any]:
    """``credbroker audit verify``'s check, now: chain, periodic checkpoints and the head."""
    checked_at = datetime.now(UTC)
    try:
        cps = read_checkpoints(Path(str(log) + ".checkpoints")) \
            if Path(str(log) + ".checkpoints").exists() else []
        head = read_head(head_path_of(log)) if public_key else None
        if head is not None:
            cps.append(head)
        key = _public_key(str(public_key)) if public_key and cps else None
        with log.open("rb") as f:
            v = verify_chain(f, cps, key, signed_to_end=head is not None)
    except (OSError, CredbrokerError, ValueError) as exc:
        return {"ok": False, "problem": f"cannot verify: {exc}", "at": checked_at}
    return {"ok": v.ok, "records": v.records, "checkpoints": v.checkpoints_checked,
            "problem": v.problem, "at": checked_at, "head": v.head}


def verify_store_now(url: str, public_key: Path | None) -> dict[str, Any]:
    """The same check of the audit log in a PostgreSQL store: every replica's chain."""
    from broker.adapters.audit_pg import verify_db

    checked_at = datetime.now(UTC)
    try:
        v = verify_db(url, [_public_key(str(public_key))] if public_key else [])
    except (CredbrokerError, ValueError) as exc:
        return {"ok": False, "problem": f"cannot verify: {exc}", "at": checked_at}
    problems = [*v.problems, *(f"chain {c.origin}: {c.verdict.problem}" for c in v.chains
                               if not c.verdict.ok)]
    return {"ok": v.ok, "records": v.records,
            "checkpoints": sum(c.verdict.checkpoints_checked for c in v.chains),
            "problem": "; ".join(problems), "at": checked_at}


def _records(cfg: Any) -> list[dict[str, Any]]:
    """Every audit record the console reads: the store's (all replicas) or the file's.

    Raises: AuditError, OSError.
    """
    if cfg.audit_store:
        from broker.adapters.audit_pg import read_db_records

        return list(read_db_records(cfg.audit_store))
    return list(read_records(cfg.audit_log))


def badge(v: dict[str, Any]) -> str:
    at = v["at"].strftime("%Y-%m-%d %H:%M:%S UTC")
    if v["ok"]:
        return (f'<p class="badge-verified" data-testid="verified">✔ Verified: the chain of '
                f'{v["records"]} records is intact and matches {v["checkpoints"]} signed '
                f"checkpoint(s) — checked {at}</p>")
    return (f'<p class="badge-broken" data-testid="not-verified">✖ NOT VERIFIED: '
            f'{e(v["problem"])} — checked {at}</p>')


def _matches(r: dict[str, Any], q: str) -> bool:
    def walk(x: Any) -> bool:
        if isinstance(x, dict):
            return any(walk(v) for v in x.values())
        if isinstance(x, list):
            return any(walk(v) for v in x)
        return isinstance(x, str) and x == q
    return walk(r)


def _audit_search(cfg: Any, q: str) -> tuple[list[str] | None, list[dict[str, Any]]]:
    records = _records(cfg)
    t = trace(records, q)
    lines = trace_lines(t, datetime.now(UTC)) if t is not None else None
    hits = [r for r in records if _matches(r, q)][-200:] if t is None else []
    return lines, hits


async def audit(request: web.Request) -> web.StreamResponse:
    c = console_app._c(request)
    s = console_app._s(request)
    log = c.cfg.audit_log
    if log is None and not c.cfg.audit_store:
        return console_app._html(views.message_page(
            "Audit", "This console was started without --audit-log or --audit-store.", s),
            200)
    loop = asyncio.get_running_loop()
    if c.cfg.audit_store:
        v = await loop.run_in_executor(None, verify_store_now, c.cfg.audit_store,
                                       c.cfg.audit_public_key)
    else:
        assert log is not None
        v = await loop.run_in_executor(None, verify_now, log, c.cfg.audit_public_key)
    q = request.query.get("q", "").strip()[:300]
    out = ""
    if q:
        lines, hits = await loop.run_in_executor(None, _audit_search, c.cfg, q)
        if lines is not None:
            out = (f'<h2>Trace of <code>{e(q)}</code></h2>'
                   f'<pre class="trace" data-testid="trace">{e(chr(10).join(lines))}</pre>')
        elif hits:
            rows = "".join(
                f"<tr><td>{e(str(r.get('time', '')))}</td><td>{e(str(r.get('event', '')))}"
                f"</td><td><code>{e(str(r.get('spiffe_id', '')))}</code></td><td>"
                + (f'<a href="/audit?q={e(str(r["request_id"]))}">trace</a>'
                   if r.get("request_id") else "") + "</td></tr>" for r in reversed(hits))
            out = (f"<h2>{len(hits)} record(s) naming <code>{e(q)}</code></h2>"
                   f"<table><tr><th>time</th><th>event</th><th>identity</th><th></th></tr>"
                   f"{rows}</table>")
        else:
            out = f'<p class="empty">Nothing in the audit log names <code>{e(q)}</code>.</p>'
    form = ('<form method="get" action="/audit" class="filters"><label>Credential, request, '
            'approval, identity or event id <input name="q" size="60" '
            f'value="{e(q)}"></label><button type="submit">Search</button></form>')
    return console_app._html(views.layout("Audit", badge(v) + form + out, s, "/audit"))


async def reviews(request: web.Request) -> web.StreamResponse:
    c = console_app._c(request)
    s = console_app._s(request)
    try:
        items = await c.api.pending(review=True)
    except BrokerRefused as exc:
        return console_app._refused(request, exc, "/reviews")
    cards = []
    for a in items:
        reviewers = _reviewers(c, a.action_class)
        r = a.request
        if reviewers is not None and not set(s.person.groups) & set(reviewers):
            act = (f'<p class="cannot">Only members of {e(", ".join(reviewers))} may sign off '
                   f"{e(a.action_class)} break-glass uses; you are in "
                   f'{e(", ".join(s.person.groups) or "no group")}.</p>')
        else:
            act = (f'<form method="post" action="/reviews/{e(a.id)}/signoff">'
                   f'{views.csrf_field(s)}<label>Review notes (required)<textarea name="reason" '
                   'required maxlength="1000"></textarea></label>'
                   '<button type="submit">Sign off</button></form>')
        ev = r.initiating_event
        cards.append(
            f'<article class="approval" data-testid="review"><h2>{e(a.action_class)} '
            f"<small>{e(a.id)}</small></h2><dl>"
            f"<dt>Agent</dt><dd><code>{e(a.spiffe_id)}</code></dd>"
            f"<dt>Target</dt><dd>{e(r.target) or 'none'}</dd>"
            f"<dt>Initiating event</dt><dd>{e(ev.source)} {e(ev.id)} {e(ev.summary)}</dd>"
            f"<dt>Justification</dt><dd>{e(r.justification)}</dd>"
            f"<dt>Used at</dt><dd>{views.when(a.created_at)}</dd>"
            f"<dt>Credential</dt><dd><a href=\"/audit?q={e(a.credential_id)}\">"
            f"{e(a.credential_id) or '-'}</a></dd>"
            f"<dt>Owner</dt><dd>{e(a.owner_team)}</dd>"
            f"<dt>Reviewers</dt><dd>{e(', '.join(reviewers or ['(the broker decides)']))}</dd>"
            f"</dl>{act}</article>")
    body = "".join(cards) or '<p class="empty">No break-glass use awaits review.</p>'
    return console_app._html(views.layout("Break-glass reviews", body, s, "/reviews"))


def _reviewers(c: console_app.Console, action_class: str) -> list[str] | None:
    cls = c.scope_map.classes.get(action_class) if c.scope_map else None
    if cls is None or cls.approval is None or cls.approval.break_glass is None:
        return None
    return list(cls.approval.break_glass.reviewers)


async def sign_off(request: web.Request) -> web.StreamResponse:
    c = console_app._c(request)
    s = console_app._s(request)
    aid = request.match_info["id"]
    form = await request.post()
    reason = str(form.get("reason", "")).strip()
    try:
        found = next((a for a in await c.api.pending(review=True) if a.id == aid), None)
    except BrokerRefused as exc:
        return console_app._refused(request, exc, "/reviews")
    if found is None:
        return console_app._html(views.message_page(
            "Nothing to sign off", f"{aid} awaits no review.", s, back="/reviews"), 409)
    reviewers = _reviewers(c, found.action_class)
    if reviewers is not None and not set(s.person.groups) & set(reviewers):
        return console_app._forbidden(request, f"Only members of {', '.join(reviewers)} may "
                                               "sign off this break-glass use.", "/reviews")
    if not reason:
        return console_app._html(views.message_page(
            "Notes required", "Say what you reviewed.", s, back="/reviews"), 400)
    try:
        await c.api.decide("SignOff", aid, reason, s.person.id_token)
    except BrokerRefused as exc:
        return console_app._refused(request, exc, "/reviews")
    s.flash.append(("ok", f"Signed off break-glass use {aid}."))
    raise web.HTTPSeeOther("/reviews")


async def overview(request: web.Request) -> web.StreamResponse:
    c = console_app._c(request)
    s = console_app._s(request)
    now = datetime.now(UTC)
    try:
        pending = await c.api.pending()
        frozen = await c.api.freezes()
        review = await c.api.pending(review=True)
    except BrokerRefused as exc:
        return console_app._refused(request, exc, "/overview")
    charts = ""
    if c.cfg.audit_store or (c.cfg.audit_log is not None and c.cfg.audit_log.exists()):
        cfg = c.cfg
        report = await asyncio.get_running_loop().run_in_executor(
            None, lambda: build_report(_records(cfg), since=now - timedelta(hours=24)))
        classes = sorted(report.classes.values(), key=lambda x: x.action_class)
        charts += _bar_chart("Decisions per action class, last 24 h (issued / needed approval "
                             "/ denied)", [
            (x.action_class, [("allowed", x.allowed, "#2e7d32"),
                              ("needed approval", x.needed_approval, "#f9a825"),
                              ("denied", x.denied, "#c62828")]) for x in classes])
        charts += _bar_chart("Break-glass uses, last 24 h", [
            (x.action_class, [("uses", x.break_glass_uses, "#6a1b9a")]) for x in classes
            if x.break_glass_uses]) if any(x.break_glass_uses for x in classes) else ""
    charts += _bar_chart("Right now", [
        ("approvals pending", [("pending", len(pending), "#f9a825")]),
        ("break-glass awaiting review", [("awaiting", len(review), "#ef6c00")]),
        ("frozen agents", [("agents", sum(f.kind == "spiffe_id" for f in frozen), "#1565c0")]),
        ("frozen classes", [("classes", sum(f.kind != "spiffe_id" for f in frozen),
                             "#1565c0")])])
    body = f'<div class="charts" data-testid="charts">{charts}</div>'
    return console_app._html(views.layout("Overview", body, s, "/overview"))


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/audit", audit)
    r.add_get("/reviews", reviews)
    r.add_post("/reviews/{id}/signoff", sign_off)
    r.add_get("/overview", overview)
