"""The agent-facing HTTP/JSON API on a unix socket (DESIGN.md, "Sidecar HTTP API").

``POST /v1/credentials``, ``DELETE /v1/credentials/{id}``, ``GET /healthz``.
Every error body is ``{"error": {"code", "message", ...}}``. Tokens are
returned to the agent in the 200 body and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from broker._proto.credbroker.v1 import broker_pb2 as pb
from sidecar.broker_client import BrokerCallError, BrokerClient, decision_to_json
from sidecar.cache import CachedCredential, CredentialCache

_log = logging.getLogger("credbroker.sidecar")
_MAX_BODY = 64 * 1024
_PREFIX = "/v1/credentials"


class BadRequest(Exception):
    pass


def parse_issue_body(raw: bytes) -> pb.IssueCredentialRequest:
    """Validate the JSON body of ``POST /v1/credentials``.

    Raises:
        BadRequest: the body is not the documented JSON object; the message says what to send.
    """
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
                         ) from None
    if not isinstance(body, dict):
        raise BadRequest('send a JSON object, e.g. {"action_class": "enrichment"}')
    allowed = {"action_class", "target", "initiating_event", "justification", "ttl_seconds",
               "break_glass", "approval_id", "wait_seconds"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(allowed))}")
    ac = body.get("action_class")
    if not isinstance(ac, str) or not ac.strip():
        raise BadRequest('action_class is required and must be a string, e.g. "enrichment"')
    msg = pb.IssueCredentialRequest(action_class=ac)
    for name in ("target", "justification"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")
        if value:
            setattr(msg, name, value)
    bg = body.get("break_glass")
    if bg is not None:
        if not isinstance(bg, bool):
            raise BadRequest("break_glass must be true or false")
        msg.break_glass = bg
    aid = body.get("approval_id")
    if aid is not None:
        if not isinstance(aid, str) or not aid:
            raise BadRequest("approval_id must be the id a 202 answer gave you")
        msg.approval_id = aid
    ttl = body.get("ttl_seconds")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise BadRequest("ttl_seconds must be a positive integer number of seconds")
        msg.ttl_seconds = min(ttl, 2**31)
    ev = body.get("initiating_event")
    if ev is not None:
        if not isinstance(ev, dict) or set(ev) - {"source", "id", "summary"}:
            raise BadRequest('initiating_event must be {"source": str, "id": str, '
                             '"summary": str (optional)}')
        for k in ("source", "id", "summary"):
            if ev.get(k) is not None and not isinstance(ev.get(k), str):
                raise BadRequest(f"initiating_event.{k} must be a string")
        msg.initiating_event.source = ev.get("source") or ""
        msg.initiating_event.id = ev.get("id") or ""
        msg.initiating_event.summary = ev.get("summary") or ""
    return msg


def wait_seconds(value: object) -> int:
    """Raises: BadRequest unless 0..60 whole seconds."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 60:
        raise BadRequest("wait_seconds must be a whole number of seconds from 0 to 60")
    return value


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


class SidecarService:
    """The sidecar's behaviour, independent of HTTP plumbing."""

    def __init__(self, client: BrokerClient, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.client = client
        self.cache = CredentialCache()
        self._clock = clock
        self.synced = threading.Event()  # set once the first revocation sync arrived
        self._stop = threading.Event()

    def start_watching(self) -> None:
        """Follow the broker's revocations: cached credentials that died are dropped."""
        self.client.watch(self.on_revocation_event, self._stop)

    def stop_watching(self) -> None:
        self._stop.set()

    def on_revocation_event(self, event: pb.RevocationEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "sync":
            dropped = self.cache.keep_only(set(event.sync.live_credential_ids))
            if event.sync.frozen:
                self.cache.clear()
            self.synced.set()
            _log.info("revocation stream (re)synchronised; %d cached credential(s) dropped",
                      dropped)
        elif kind == "revoked":
            for cid in event.revoked.credential_ids:
                if self.cache.drop(cid):
                    _log.info("cached credential_id=%s dropped: revoked", cid)
        elif kind == "frozen":
            if event.frozen.identity:
                self.cache.clear()
            elif event.frozen.action_class:
                self.cache.drop_class(event.frozen.action_class)
            _log.warning("freeze by %s: %s; cached credentials dropped", event.frozen.by,
                         event.frozen.reason)

    def issue(self, msg: pb.IssueCredentialRequest, wait: int = 0) -> tuple[int, dict[str, Any]]:
        now = self._clock()
        plain = not msg.approval_id and not msg.break_glass
        cached = self.cache.get(msg.action_class, msg.target, now) if plain else None
        if cached is not None:
            return 200, {**cached.body, "cached": True}
        resp = self.client.issue(msg)
        if not resp.HasField("credential") and resp.HasField("approval"):
            if wait:
                return self.await_approval(resp.approval.id, wait)
            return 202, _pending(resp)
        return self._credential(resp, msg.action_class, msg.target, now)

    def await_approval(self, approval_id: str, wait: int) -> tuple[int, dict[str, Any]]:
        resp = self.client.await_approval(approval_id, wait)
        if not resp.HasField("credential"):
            return 202, _pending(resp)
        req = resp.approval.request
        return self._credential(resp, req.action_class, req.target, self._clock())

    def _credential(self, resp: pb.IssueCredentialResponse, action_class: str, target: str,
                    now: datetime) -> tuple[int, dict[str, Any]]:
        cred = resp.credential
        expires = cred.expires_at.ToDatetime(tzinfo=UTC)
        body = {
            "credential_id": cred.credential_id,
            "token": cred.token,
            "expires_at": _rfc3339(expires),
            "ttl_seconds": cred.ttl_seconds,
            "action_class": resp.decision.action_class,
            "policies": list(cred.policies),
            "request_id": resp.request_id,
            "decision": decision_to_json(resp.decision),
        }
        if resp.HasField("approval"):
            body["approval"] = _approval_json(resp.approval)
        else:
            # Only plain issuances are cached: a credential released by one person's
            # approval (or break-glass) is for that exact request, never a later one.
            self.cache.put(action_class, target, CachedCredential(
                credential_id=cred.credential_id, issued_at=now, expires_at=expires, body=body))
        _log.info("issued credential_id=%s action_class=%s request_id=%s", cred.credential_id,
                  resp.decision.action_class, resp.request_id)
        return 200, {**body, "cached": False}

    def hand_back(self, credential_id: str) -> tuple[int, dict[str, Any]]:
        self.cache.drop(credential_id)
        resp = self.client.revoke(credential_id, "handed back by the agent")
        _log.info("handed back credential_id=%s already_dead=%s", credential_id,
                  resp.already_dead)
        return 200, {"credential_id": credential_id, "revoked": not resp.already_dead,
                     "already_dead": resp.already_dead}

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            sid = self.client.spiffe_id
        except Exception as exc:
            return 503, _error("workload_api_unavailable",
                               f"no SVID from the Workload API ({type(exc).__name__})")
        return 200, {"status": "ok", "spiffe_id": sid, "cached_credentials": len(self.cache)}


def _approval_json(a: pb.ApprovalInfo) -> dict[str, Any]:
    return {"approval_id": a.id, "status": a.state, "action_class": a.action_class,
            "approvers": list(a.approvers), "approvals_required": a.approvals_required,
            "approved_by": [v.subject for v in a.votes],
            "expires_at": _rfc3339(a.expires_at.ToDatetime(tzinfo=UTC))}


def _pending(resp: pb.IssueCredentialResponse) -> dict[str, Any]:
    body = _approval_json(resp.approval)
    body["poll"] = f"/v1/approvals/{resp.approval.id}?wait=30"
    body["request_id"] = resp.request_id
    if resp.HasField("decision"):
        body["decision"] = decision_to_json(resp.decision)
    return body


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


class _Handler(BaseHTTPRequestHandler):
    server: SidecarHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("http %s", format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _guard(self, fn: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        try:
            self._send(*fn())
        except BadRequest as exc:
            self._send(400, _error("bad_request", str(exc)))
        except BrokerCallError as exc:
            extra = {"decision": exc.decision} if exc.decision else {}
            self._send(exc.http_status, _error(exc.code, exc.message, **extra))
        except Exception:
            _log.exception("unexpected sidecar error")
            self._send(500, _error("internal", "the sidecar failed unexpectedly; its log has "
                                               "the details"))

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if self.path == "/healthz":
            self._guard(self.server.service.health)
        elif path.startswith("/v1/approvals/") and path.count("/") == 3:
            params = urllib.parse.parse_qs(query)
            approval_id = path.rsplit("/", 1)[1]

            def poll() -> tuple[int, dict[str, Any]]:
                raw = params.get("wait", ["0"])[0]
                if not raw.isdigit():
                    raise BadRequest("wait must be a whole number of seconds from 0 to 60")
                return self.server.service.await_approval(approval_id,
                                                          wait_seconds(int(raw)))

            self._guard(poll)
        else:
            self._send(404, _error("not_found", f"no such endpoint GET {self.path}; "
                                                "try POST /v1/credentials or GET /healthz"))

    def do_POST(self) -> None:
        if self.path != _PREFIX:
            self._send(404, _error("not_found", f"no such endpoint POST {self.path}; "
                                                f"use POST {_PREFIX}"))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(400, _error("bad_request", "Content-Length must be a non-negative number"))
            return
        if length > _MAX_BODY:
            self._send(413, _error("too_large", f"body is larger than {_MAX_BODY} bytes"))
            return
        raw = self.rfile.read(length)

        def issue() -> tuple[int, dict[str, Any]]:
            msg = parse_issue_body(raw)
            body = json.loads(raw)
            return self.server.service.issue(msg, wait_seconds(body.get("wait_seconds")))

        self._guard(issue)

    def do_DELETE(self) -> None:
        prefix = _PREFIX + "/"
        cid = self.path[len(prefix):] if self.path.startswith(prefix) else ""
        if not cid or "/" in cid:
            self._send(404, _error("not_found", f"use DELETE {_PREFIX}/<credential_id>"))
            return
        self._guard(lambda: self.server.service.hand_back(cid))


class SidecarHttpServer(socketserver.ThreadingMixIn, HTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True

    def __init__(self, path: Path, service: SidecarService) -> None:
        self.service = service
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        super().__init__(str(path), _Handler)  # type: ignore[arg-type]
        os.chmod(path, 0o660)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "credbroker-sidecar", 0

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="sidecar-http", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
