"""The web console: aiohttp, server-rendered, on the broker's asyncio stack (no JS build).

Why this shape: aiohttp is already the sidecar's server, grpc.aio shares its event
loop, and server-rendered pages need no JavaScript toolchain. The one script
(static/console.js, vendored, ~80 lines) only follows the live approvals stream
(server-sent events), counts down, and ticks "select all"; every page works without it.

Security: HTTPS only; session cookies ``HttpOnly; Secure; SameSite=Strict`` (``__Host-``);
a per-session CSRF token on every POST plus a same-origin check; a strict CSP with no
inline script or style and no third-party asset; sessions end at the ID token's
expiry, after ``session_ttl`` or ``idle_timeout``; every act is checked against the
person's groups here and again by the broker, which records the person.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.config import load_scope_map
from broker.console import views
from broker.console.brokerapi import BrokerApi, BrokerRefused
from broker.console.oidc import LoginError, OidcClient
from broker.console.sessions import LOGIN_COOKIE, LOGIN_TTL, SESSION_COOKIE, Session, SessionStore
from broker.core.scopemap import ScopeMap
from broker.options import DEFAULT_BROKER_DNS

_log = logging.getLogger("credbroker.console")
STATIC = Path(__file__).parent / "static"
e = views.e

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PUBLIC = ("/login", "/callback", "/static/", "/loggedout", "/healthz")
_STATUS = {"PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "INVALID_ARGUMENT": 400,
           "NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "UNAVAILABLE": 503,
           "RESOURCE_EXHAUSTED": 429}


@dataclass(frozen=True, kw_only=True)
class ConsoleConfig:
    tls_cert: Path
    tls_key: Path
    broker_addr: str
    workload_api: str
    oidc_issuer: str
    host: str = "127.0.0.1"
    port: int = 8600
    broker_dns_name: str = DEFAULT_BROKER_DNS
    oidc_client_id: str = "credbroker-approvals"
    public_url: str = ""  # https://host:port as browsers reach it (default: the listen address)
    responder_groups: tuple[str, ...] = ("responders",)
    owner_team_cannot_approve: bool = False
    scope_map: Path | None = None
    audit_log: Path | None = None
    #: The PostgreSQL store whose audit log (every replica's chain) the pages read, when
    #: the brokers keep it there; wins over ``audit_log``.
    audit_store: str = ""
    audit_public_key: Path | None = None
    session_ttl: float = 8 * 3600
    idle_timeout: float = 1800
    poll_interval: float = 1.0
    ready_file: Path | None = None


@dataclass
class Console:
    cfg: ConsoleConfig
    api: BrokerApi
    oidc: OidcClient
    sessions: SessionStore
    http: aiohttp.ClientSession
    scope_map: ScopeMap | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


KEY: web.AppKey[Console] = web.AppKey("console", Console)


def _c(request: web.Request) -> Console:
    return request.app[KEY]


def _s(request: web.Request) -> Session:
    s = request.get("session")
    assert isinstance(s, Session)
    return s


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _see_other(location: str) -> web.Response:
    """Post/redirect/get (raised: aiohttp's redirects are exceptions)."""
    raise web.HTTPSeeOther(location)


def _refused(request: web.Request, exc: BrokerRefused, back: str) -> web.Response:
    return _html(views.message_page("The broker refused", exc.message, _s(request), back=back),
                 _STATUS.get(exc.status, 502))


def _forbidden(request: web.Request, text: str, back: str) -> web.Response:
    return _html(views.message_page("Not allowed", text, request.get("session"), back=back),
                 403)


# -- middlewares


@web.middleware
async def security_headers(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        resp = exc
    h = resp.headers
    h.setdefault("Content-Security-Policy", CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "same-origin")  # "no-referrer" makes Origin null
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    h.setdefault("Strict-Transport-Security", "max-age=31536000")
    if not request.path.startswith("/static/"):
        h.setdefault("Cache-Control", "no-store")
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


@web.middleware
async def authenticate(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    c = _c(request)
    s = c.sessions.get(request.cookies.get(SESSION_COOKIE))
    if s is None:
        if any(request.path == p or (p.endswith("/") and request.path.startswith(p))
               for p in PUBLIC):
            return await handler(request)
        if request.method == "GET" and request.path != "/events":
            raise web.HTTPSeeOther("/login?next=" + request.path_qs.replace("&", "%26"))
        return _html(views.message_page(
            "Signed out", "Your session has ended (expired, or you signed out): sign in "
            "again; nothing was done.", None, back="/login"), 401)
    request["session"] = s
    if request.method == "POST":
        form = await request.post()
        sent = str(form.get("csrf", ""))
        origin = request.headers.get("Origin")
        if origin is not None and origin != _origin(c):
            return _forbidden(request, "This request came from another site; nothing was "
                                       "done.", "/")
        if not sent or not hmac.compare_digest(sent, s.csrf):
            return _forbidden(request, "The form's security token is stale or missing (the "
                                       "page is from an older session): reload the page and "
                                       "try again; nothing was done.", request.path)
    return await handler(request)


def _origin(c: Console) -> str:
    return c.cfg.public_url.rstrip("/")


# -- sign-in


def _cookie(resp: web.StreamResponse, name: str, value: str, *, max_age: int,
            samesite: str) -> None:
    resp.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True,
                    samesite=samesite)


async def login(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    nxt = request.query.get("next", "/")
    if not nxt.startswith("/") or nxt.startswith("//"):
        nxt = "/"
    st, url = c.oidc.start(nxt)
    lid = c.sessions.begin_login(st)
    resp = web.HTTPSeeOther(url)
    _cookie(resp, LOGIN_COOKIE, lid, max_age=int(LOGIN_TTL), samesite="Lax")
    raise resp


async def callback(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    st = c.sessions.end_login(request.cookies.get(LOGIN_COOKIE))
    state = request.query.get("state", "")
    if st is None or not hmac.compare_digest(state, st.state):
        return _html(views.message_page("Sign-in failed", "This sign-in was not started "
                                        "here, or took too long: sign in again.", None,
                                        back="/login"), 400)
    if "error" in request.query:
        return _html(views.message_page("Sign-in cancelled", "The identity provider said: "
                                        f"{request.query['error'][:100]}", None,
                                        back="/login"), 401)
    try:
        person = await c.oidc.finish(c.http, st, request.query.get("code", ""))
    except LoginError as exc:
        return _html(views.message_page("Sign-in failed", str(exc), None, back="/login"), 401)
    s = c.sessions.open(person)
    _log.info("%s signed in to the console", person.subject)
    # A page, not a redirect: the Strict session cookie is not sent on a navigation that
    # began at the identity provider; this page's own navigation to the console is same-site.
    nxt = e(st.next_path)
    resp = _html("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                 f'<meta http-equiv="refresh" content="0;url={nxt}">'
                 '<link rel="stylesheet" href="/static/console.css"><title>Signed in</title>'
                 f'</head><body><main><p>Signed in as {e(person.subject)}. '
                 f'<a href="{nxt}">Continue</a></p></main></body></html>')
    _cookie(resp, SESSION_COOKIE, s.id, max_age=int(s.expires_at - s.last_seen),
            samesite="Strict")
    resp.del_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    c.sessions.close(s.id)
    _log.info("%s signed out of the console", s.person.subject)
    resp = web.HTTPSeeOther("/loggedout")
    resp.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    raise resp


async def logged_out(request: web.Request) -> web.StreamResponse:
    return _html(views.layout("Signed out", '<p>You are signed out. <a href="/login">Sign in'
                                            "</a></p>", None))


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/approvals")


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


# -- approvals


async def _approvals_fragment(request: web.Request) -> str:
    c = _c(request)
    items = await c.api.pending()
    return views.approvals_list(items, _s(request), c.scope_map,
                                owner_team_cannot_approve=c.cfg.owner_team_cannot_approve)


async def approvals(request: web.Request) -> web.StreamResponse:
    try:
        fragment = await _approvals_fragment(request)
    except BrokerRefused as exc:
        return _refused(request, exc, "/approvals")
    return _html(views.approvals_page(fragment, _s(request)))


async def approvals_list(request: web.Request) -> web.StreamResponse:
    try:
        return _html(await _approvals_fragment(request))
    except BrokerRefused as exc:
        return _html(f'<p class="error">{e(exc.message)}</p>', 502)


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``approvals`` whenever the pending list changes."""
    c = _c(request)
    sid = _s(request).id
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)
    last = ""
    quiet = 0.0
    try:
        while not c.stopping.is_set() and c.sessions.get(sid) is not None:
            try:
                items = await c.api.pending()
                sig = hashlib.sha256(repr(sorted(
                    (a.id, a.state, len(a.votes), a.escalated) for a in items)).encode()
                ).hexdigest()
            except BrokerRefused:
                sig = "unavailable"
            if sig != last:
                await resp.write(f"event: approvals\ndata: {sig[:16]}\n\n".encode())
                last, quiet = sig, 0.0
            elif quiet >= 15:
                await resp.write(b": keep-alive\n\n")
                quiet = 0.0
            try:
                await asyncio.wait_for(c.stopping.wait(), c.cfg.poll_interval)
            except TimeoutError:
                quiet += c.cfg.poll_interval
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


async def decide(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    aid = request.match_info["id"]
    form = await request.post()
    approve = form.get("decision") == "approve"
    reason = str(form.get("reason", "")).strip()
    try:
        found = next((a for a in await c.api.pending() if a.id == aid), None)
    except BrokerRefused as exc:
        return _refused(request, exc, "/approvals")
    if found is None:
        return _html(views.message_page("Nothing to decide", f"Approval {aid} is not pending "
                                        "(decided, expired or unknown).", s, back="/approvals"),
                     409)
    why_not = views.may_decide(found, s.person.subject, s.person.groups,
                               owner_team_cannot_approve=c.cfg.owner_team_cannot_approve,
                               approve=approve)
    if why_not:
        _log.warning("console refused %s's %s of %s: %s", s.person.subject,
                     "approval" if approve else "denial", aid, why_not)
        return _forbidden(request, why_not, "/approvals")
    if not reason:
        return _html(views.message_page("A reason is required", "Say why: the reason goes "
                                        "into the audit log.", s, back="/approvals"), 400)
    try:
        a = await c.api.decide("Approve" if approve else "Deny", aid, reason,
                               s.person.id_token)
    except BrokerRefused as exc:
        return _refused(request, exc, "/approvals")
    s.flash.append(("ok", f"{'Approved' if approve else 'Denied'} {a.action_class} for "
                          f"{a.spiffe_id} ({a.id}): now {a.state}."))
    return _see_other("/approvals")


# -- credentials


def _when_param(value: str, name: str) -> datetime | None:
    if not value:
        return None
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be a date and time, e.g. 2025-01-31T14:00") from None
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d


def _selector(q: Any) -> pb.Selector:
    """Raises: ValueError (a malformed time)."""
    sel = pb.Selector(spiffe_id=str(q.get("spiffe_id", "")).strip(),
                      action_class=str(q.get("action_class", "")).strip(),
                      target=str(q.get("target", "")).strip(),
                      environment=str(q.get("environment", "")).strip())
    since = _when_param(str(q.get("since", "")), "since")
    until = _when_param(str(q.get("until", "")), "until")
    if since:
        sel.since.FromDatetime(since)
    if until:
        sel.until.FromDatetime(until)
    if not (sel.spiffe_id or sel.action_class or sel.target or sel.environment or since
            or until):
        sel.all = True
    return sel


def _responder(c: Console, s: Session, what: str) -> str:
    if set(s.person.groups) & set(c.cfg.responder_groups):
        return ""
    return (f"You may not {what}: only members of {', '.join(c.cfg.responder_groups)} may "
            f"revoke, freeze and unfreeze, and you are in "
            f"{', '.join(s.person.groups) or 'no group'}.")


async def credentials(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    q = request.query
    try:
        creds = await c.api.credentials(_selector(q))
    except ValueError as exc:
        return _html(views.message_page("Bad filter", str(exc), s, back="/credentials"), 400)
    except BrokerRefused as exc:
        return _refused(request, exc, "/credentials")
    may = not _responder(c, s, "revoke")
    f = {k: e(q.get(k, "")) for k in ("spiffe_id", "action_class", "target", "environment",
                                      "since", "until")}
    filters = ('<form method="get" action="/credentials" class="filters">'
               f'<label>Identity pattern <input name="spiffe_id" value="{f["spiffe_id"]}" '
               'placeholder="spiffe://example.org/agent/*"></label>'
               f'<label>Action class <input name="action_class" value="{f["action_class"]}">'
               f'</label><label>Target <input name="target" value="{f["target"]}"></label>'
               f'<label>Environment <input name="environment" value="{f["environment"]}" '
               'placeholder="any"></label>'
               f'<label>Issued since (UTC) <input type="datetime-local" name="since" '
               f'value="{f["since"]}"></label><label>until (UTC) <input type="datetime-local" '
               f'name="until" value="{f["until"]}"></label>'
               '<button type="submit">Filter</button> <a href="/credentials">clear</a></form>')
    counts = (f'<div class="counts-row"><p class="total" data-testid="live-count">'
              f"{len(creds)} live credential(s)</p>"
              + views.counts_table("Live by identity", Counter(x.spiffe_id for x in creds))
              + views.counts_table("Live by class", Counter(x.action_class for x in creds))
              + "</div>")
    table = views.credential_rows(creds, selectable=may)
    if may:
        table = (f'<form method="post" action="/credentials/revoke">{views.csrf_field(s)}'
                 f'{table}<button type="submit" name="selection" value="1">Revoke selected…'
                 "</button></form>")
    else:
        table += (f'<p class="cannot">{e(_responder(c, s, "revoke credentials"))}</p>')
    return _html(views.layout("Live credentials", filters + counts + table, s,
                              "/credentials"))


async def revoke(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    refused = _responder(c, s, "revoke credentials")
    if refused:
        return _forbidden(request, refused, "/credentials")
    form = await request.post()
    ids = [str(form["only"])] if form.get("only") else \
        [str(v) for v in form.getall("credential_id", [])]
    if not ids:
        s.flash.append(("error", "Select at least one credential to revoke."))
        return _see_other("/credentials")
    sel = pb.Selector(credential_ids=ids)
    try:
        creds = await c.api.credentials(sel)
    except BrokerRefused as exc:
        return _refused(request, exc, "/credentials")
    if not creds:
        s.flash.append(("error", "None of the selected credentials is live any more; nothing "
                                 "to revoke."))
        return _see_other("/credentials")
    reason = str(form.get("reason", "")).strip()
    if form.get("confirm") != "1" or not reason:
        hidden = "".join(f'<input type="hidden" name="credential_id" value="{e(x.credential_id)}">'
                         for x in creds)
        body = (f'<p data-testid="preview">{len(creds)} live credential(s) would be revoked:</p>'
                f"{views.preview_table(creds)}{views.credential_rows(creds, selectable=False)}"
                f'<form method="post" action="/credentials/revoke">{views.csrf_field(s)}{hidden}'
                '<input type="hidden" name="confirm" value="1">'
                '<label>Reason (required, recorded in the audit log)<textarea name="reason" '
                'required maxlength="1000"></textarea></label>'
                f'<button type="submit" class="deny">Revoke {len(creds)} credential(s)</button> '
                '<a href="/credentials">cancel</a></form>')
        return _html(views.layout("Revoke credentials: preview", body, s, "/credentials"))
    try:
        summary = await c.api.revoke(pb.Selector(credential_ids=[x.credential_id
                                                                 for x in creds]),
                                     reason, s.person.id_token)
    except BrokerRefused as exc:
        return _refused(request, exc, "/credentials")
    text = (f"Revoked {summary.revoked}; already dead {summary.already_dead}; "
            f"pending {summary.pending}; failed {summary.failed}.")
    s.flash.append(("ok" if not summary.failed else "error", text))
    return _see_other("/credentials")


# -- freezes


def _target(form: Any) -> tuple[str, str, str]:
    """(kind, spiffe_id, action_class)."""
    kind = str(form.get("kind", "spiffe_id"))
    pattern = str(form.get("pattern", "")).strip()
    return (kind, pattern, "") if kind == "spiffe_id" else (kind, "", pattern)


async def freezes(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    try:
        items = await c.api.freezes()
    except BrokerRefused as exc:
        return _refused(request, exc, "/freezes")
    refused = _responder(c, s, "freeze or unfreeze")
    rows = []
    for f in items:
        act = "" if refused else (
            f'<form method="post" action="/unfreeze" class="inline">{views.csrf_field(s)}'
            f'<input type="hidden" name="kind" value="{e(f.kind)}">'
            f'<input type="hidden" name="pattern" value="{e(f.pattern)}">'
            f'<input name="reason" required maxlength="1000" placeholder="reason" '
            f'aria-label="reason to unfreeze {e(f.pattern)}">'
            '<button type="submit">Unfreeze</button></form>')
        rows.append(f'<tr data-testid="freeze"><td>{e(f.kind)}</td><td><code>{e(f.pattern)}'
                    f"</code></td><td>{e(f.by)}</td><td>{e(f.reason)}</td>"
                    f"<td>{views.when(f.created_at)}</td><td>{act}</td></tr>")
    table = ('<table class="freezes"><tr><th>kind</th><th>pattern</th><th>by</th><th>why</th>'
             f'<th>when</th><th></th></tr>{"".join(rows)}</table>' if rows else
             '<p class="empty">Nothing is frozen.</p>')
    q = request.query
    kind = "action_class" if q.get("action_class") else "spiffe_id"
    pattern = q.get("action_class") or q.get("spiffe_id") or ""
    if refused:
        form = f'<p class="cannot">{e(refused)}</p>'
    else:
        sel = {k: " selected" if k == kind else "" for k in ("spiffe_id", "action_class")}
        form = ('<h2>Freeze</h2><form method="post" action="/freeze" class="freeze">'
                f'{views.csrf_field(s)}<label>What <select name="kind">'
                f'<option value="spiffe_id"{sel["spiffe_id"]}>an agent (SPIFFE ID pattern)'
                f'</option><option value="action_class"{sel["action_class"]}>an action class'
                f'</option></select></label><label>Pattern or class <input name="pattern" '
                f'required value="{e(pattern)}"></label><label>Reason (required) <input '
                'name="reason" required maxlength="1000"></label>'
                '<button type="submit">Freeze…</button></form>')
    return _html(views.layout("Freezes", f"<h2>Frozen now</h2>{table}{form}", s, "/freezes"))


async def freeze(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    refused = _responder(c, s, "freeze")
    if refused:
        return _forbidden(request, refused, "/freezes")
    form = await request.post()
    kind, sid, cls = _target(form)
    reason = str(form.get("reason", "")).strip()
    if not (sid or cls) or not reason:
        s.flash.append(("error", "Name what to freeze and say why."))
        return _see_other("/freezes")
    if form.get("confirm") != "1":
        try:
            creds = await c.api.credentials(pb.Selector(spiffe_id=sid, action_class=cls))
        except BrokerRefused as exc:
            return _refused(request, exc, "/freezes")
        body = (f'<p data-testid="preview">Freeze {e(kind.replace("_", " "))} '
                f"<code>{e(sid or cls)}</code>: no new credential will be issued for it, and "
                f"its {len(creds)} live credential(s) will be refused by Vault at once.</p>"
                f"{views.preview_table(creds)}<p>Reason: {e(reason)}</p>"
                f'<form method="post" action="/freeze">{views.csrf_field(s)}'
                f'<input type="hidden" name="kind" value="{e(kind)}">'
                f'<input type="hidden" name="pattern" value="{e(sid or cls)}">'
                f'<input type="hidden" name="reason" value="{e(reason)}">'
                '<input type="hidden" name="confirm" value="1">'
                '<button type="submit" class="deny">Confirm freeze</button> '
                '<a href="/freezes">cancel</a></form>')
        return _html(views.layout("Freeze: confirm", body, s, "/freezes"))
    try:
        res = await c.api.freeze(spiffe_id=sid, action_class=cls, reason=reason,
                                 id_token=s.person.id_token)
    except BrokerRefused as exc:
        return _refused(request, exc, "/freezes")
    s.flash.append(("ok", f"Frozen {res.freeze.kind} {res.freeze.pattern}: "
                          f"{res.credentials_matched} live credential(s) "
                          + ("refused by Vault." if not res.vault_pending else
                             "— Vault enforcement PENDING (the broker retries).")))
    return _see_other("/freezes")


async def unfreeze(request: web.Request) -> web.StreamResponse:
    c = _c(request)
    s = _s(request)
    refused = _responder(c, s, "unfreeze")
    if refused:
        return _forbidden(request, refused, "/freezes")
    form = await request.post()
    _kind, sid, cls = _target(form)
    reason = str(form.get("reason", "")).strip()
    if not reason:
        s.flash.append(("error", "Say why you unfreeze: the reason goes into the audit log."))
        return _see_other("/freezes")
    try:
        res = await c.api.unfreeze(spiffe_id=sid, action_class=cls, reason=reason,
                                   id_token=s.person.id_token)
    except BrokerRefused as exc:
        return _refused(request, exc, "/freezes")
    s.flash.append(("ok", f"Lifted {len(res.lifted)} freeze(s) on {sid or cls}."))
    return _see_other("/freezes")


# -- the application


def build_app(console: Console) -> web.Application:
    from broker.console import pages  # audit, reviews, overview

    app = web.Application(middlewares=[security_headers, authenticate],
                          client_max_size=256 * 1024)
    app[KEY] = console
    r = app.router
    r.add_get("/", home)
    r.add_get("/login", login)
    r.add_get("/callback", callback)
    r.add_post("/logout", logout)
    r.add_get("/loggedout", logged_out)
    r.add_get("/healthz", healthz)
    r.add_get("/approvals", approvals)
    r.add_get("/approvals/list", approvals_list)
    r.add_get("/events", events)
    r.add_post("/approvals/{id}/decide", decide)
    r.add_get("/credentials", credentials)
    r.add_post("/credentials/revoke", revoke)
    r.add_get("/freezes", freezes)
    r.add_post("/freeze", freeze)
    r.add_post("/unfreeze", unfreeze)
    pages.add_routes(r)
    r.add_static("/static/", STATIC, append_version=False)
    return app


def tls_context(cfg: ConsoleConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return ctx


async def serve(cfg: ConsoleConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set. Raises: ConfigError, OSError (cannot listen)."""
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    port = sock.getsockname()[1]
    public = cfg.public_url.rstrip("/") or f"https://{cfg.host}:{port}"
    cfg = ConsoleConfig(**{**cfg.__dict__, "public_url": public})
    ssl_ctx = tls_context(cfg)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    api = BrokerApi(workload_api=cfg.workload_api, target=cfg.broker_addr,
                    server_dns_name=cfg.broker_dns_name)
    try:
        oidc = OidcClient(issuer=cfg.oidc_issuer, client_id=cfg.oidc_client_id,
                          redirect_uri=f"{public}/callback")
        await oidc.discover(http)
        console = Console(cfg=cfg, api=api, oidc=oidc, http=http,
                          sessions=SessionStore(max_age=cfg.session_ttl,
                                                idle=cfg.idle_timeout),
                          scope_map=load_scope_map(cfg.scope_map) if cfg.scope_map else None)
        runner = web.AppRunner(build_app(console), access_log=None, shutdown_timeout=3)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=ssl_ctx).start()
        _log.info("console serving %s as %s", public, api.spiffe_id)
        if cfg.ready_file is not None:
            cfg.ready_file.write_text(public + "\n")
        await stop.wait()
        console.stopping.set()
        await runner.cleanup()
    finally:
        await http.close()
        await api.close()
