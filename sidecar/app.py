"""The agent-facing HTTP/JSON API on a unix socket (README, "The sidecar HTTP API").

``POST /v1/credentials``, ``DELETE /v1/credentials/{id}``, ``GET /healthz``, and
``GET /openapi.json`` (the committed OpenAPI 3.1 document of this API, ``sidecar/openapi.json``).
Every error body is ``{"error": {"code", "message", ...}}``, its status the code's in
``broker.errors.ERRORS``; a 429 carries ``Retry-After``. Tokens are
returned to the agent in the 200 body and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.errors import DEFAULT_RETRY_AFTER_SECONDS
from broker.inputs import ID_RULE, is_id
from sidecar.broker_client import BrokerCallError, BrokerClient, decision_to_json
from sidecar.cache import CachedCredential, CredentialCache, request_key
from sidecar.hits import HitReporter

_log = logging.getLogger("credbroker.sidecar")
_MAX_BODY = 64 * 1024
#: The documented body nests two deep ({"initiating_event": {...}}); a little slack.
_MAX_DEPTH = 8
_PREFIX = "/v1/credentials"
#: The OpenAPI 3.1 document of this API (client/scripts/generate_openapi.py writes it).
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
#: A connection that sends nothing for this long (no request, half a request, or an idle
#: keep-alive) is closed.
IDLE_TIMEOUT_SECONDS = 10.0
#: Connections served at once; beyond it a new one is answered 503 at once and closed.
MAX_CONNECTIONS = 128
#: Connections the kernel queues before the sidecar accepts them (socketserver's default: 5).
LISTEN_BACKLOG = 128

_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRequest(Exception):
    pass


def _nesting_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest, counted without recursion, in one
    linear pass (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _has_surrogate(value: object) -> bool:
    """True when a string anywhere in ``value`` (keys too) holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reject_constant(name: str) -> object:
    raise BadRequest(f"{name} is not a JSON number; send whole numbers only")


def load_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it.

    Raises:
        BadRequest: the body is not UTF-8, not JSON, nests deeper than the API ever needs,
            holds a lone surrogate (e.g. ``"\\ud800"``), or is not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: it is not UTF-8 ({exc.reason} at byte "
                         f"{exc.start})") from None
    if _nesting_depth(text) > _MAX_DEPTH:
        raise BadRequest(f"the body nests arrays or objects more than {_MAX_DEPTH} deep; send "
                         'a flat JSON object, e.g. {"action_class": "enrichment"}')
    try:
        body = json.loads(text or "null", parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON ({exc.msg} at character {exc.pos})"
                         ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5,000 digits
        raise BadRequest(f"the body is not acceptable JSON ({type(exc).__name__}: "
                         f"{str(exc)[:100]})") from None
    if not isinstance(body, dict):
        raise BadRequest('send a JSON object, e.g. {"action_class": "enrichment"}')
    if _has_surrogate(body):
        raise BadRequest("a string in the body holds a lone UTF-16 surrogate (such as "
                         '"\\ud800"), which is not text; send valid Unicode')
    return body


def parse_issue_body(raw: bytes) -> pb.IssueCredentialRequest:
    """Validate the JSON body of ``POST /v1/credentials``.

    Raises:
        BadRequest: the body is not the documented JSON object; the message says what to send.
    """
    return parse_issue(raw)[0]


def parse_issue(raw: bytes) -> tuple[pb.IssueCredentialRequest, int]:
    """The request ``POST /v1/credentials`` asks for, and its ``wait_seconds``.

    Raises:
        BadRequest: the body is not the documented JSON object; the message says what to send.
    """
    body = load_json_object(raw)
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
        if not isinstance(aid, str) or not is_id(aid):
            raise BadRequest("approval_id must be the id a 202 answer gave you "
                             f"({ID_RULE})")
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
    return msg, wait_seconds(body.get("wait_seconds"))


def wait_seconds(value: object) -> int:
    """Raises: BadRequest unless 0..60 whole seconds."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 60:
        raise BadRequest("wait_seconds must be a whole number of seconds from 0 to 60")
    return value


def _timestamp(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


class SidecarService:
    """The sidecar's behaviour, independent of HTTP plumbing.

    Only a request identical to the one a cached credential was minted for is answered
    from the cache (``sidecar.cache``); each such answer is reported to the broker
    (``sidecar.hits``), which records it as ``credential.reused``.
    """

    def __init__(self, client: BrokerClient, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 reporter: HitReporter | None = None) -> None:
        self.client = client
        self.cache = CredentialCache()
        self.reporter = reporter or HitReporter(client.report_cache_hits)
        self._clock = clock
        self.synced = threading.Event()  # set once the first revocation sync arrived
        self._stop = threading.Event()

    def start_watching(self) -> None:
        """Follow the broker's revocations and scope-map changes (cached credentials that
        died, or were decided under another map, are dropped) and report cache hits."""
        self.client.watch(self.on_revocation_event, self._stop)
        self.reporter.start(self._stop)

    def stop_watching(self, timeout: float = 5.0) -> None:
        """Stop both; wait up to ``timeout`` seconds for the last cache hits to be reported."""
        self._stop.set()
        self.reporter.join(timeout)

    def on_revocation_event(self, event: pb.RevocationEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "sync":
            dropped = self.cache.keep_only(set(event.sync.live_credential_ids))
            dropped += self.cache.set_version(event.sync.scope_map_version)
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
        elif kind == "scope_map":
            dropped = self.cache.set_version(event.scope_map.version)
            _log.warning("scope map %s is now in force; %d cached credential(s) decided under "
                         "another dropped", event.scope_map.version[:19], dropped)

    def issue(self, msg: pb.IssueCredentialRequest, wait: int = 0) -> tuple[int, dict[str, Any]]:
        now = self._clock()
        # Only plain requests use the cache: a credential released by one person's
        # approval (or break-glass) is for that exact request, never a later one.
        key = request_key(msg) if not msg.approval_id and not msg.break_glass else ""
        cached = self.cache.get(key, now, msg.ttl_seconds) if key else None
        if cached is not None:
            request_id = uuid.uuid4().hex
            hit = pb.CacheHit(credential_id=cached.credential_id, request_id=request_id,
                              request=msg, served_at=_timestamp(now))
            if self.reporter.offer(hit):
                _log.info("served cached credential_id=%s request_id=%s",
                          cached.credential_id, request_id)
                return 200, {**cached.body, "request_id": request_id,
                             "minted_request_id": cached.body["request_id"], "cached": True}
            _log.warning("%d cache hits await reporting to the broker: asking the broker "
                         "instead of answering from the cache", self.reporter.pending)
        resp = self.client.issue(msg)
        if not resp.HasField("credential") and resp.HasField("approval"):
            if wait:
                return self.await_approval(resp.approval.id, wait)
            return 202, _pending(resp)
        return self._credential(resp, key, now)

    def await_approval(self, approval_id: str, wait: int) -> tuple[int, dict[str, Any]]:
        resp = self.client.await_approval(approval_id, wait)
        if not resp.HasField("credential"):
            return 202, _pending(resp)
        return self._credential(resp, "", self._clock())

    def _credential(self, resp: pb.IssueCredentialResponse, key: str,
                    now: datetime) -> tuple[int, dict[str, Any]]:
        """The 200 body; cached under ``key`` (when not empty) unless an approval or
        break-glass released it."""
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
        elif key and not resp.decision.not_reusable:  # a time-dependent decision is not
            self.cache.put(key, CachedCredential(
                credential_id=cred.credential_id, issued_at=now, expires_at=expires, body=body,
                action_class=resp.decision.action_class,
                scope_map_version=resp.decision.scope_map_version))
        _log.info("issued credential_id=%s action_class=%s request_id=%s", cred.credential_id,
                  resp.decision.action_class, resp.request_id)
        return 200, {**body, "cached": False}

    def hand_back(self, credential_id: str) -> tuple[int, dict[str, Any]]:
        """Revoke the credential, and forget it first: identical requests answered with the
        same cached credential lose it too, and the next one gets a fresh credential.

        Raises: BrokerCallError.
        """
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
        return 200, {"status": "ok", "spiffe_id": sid, "cached_credentials": len(self.cache),
                     "unreported_cache_hits": self.reporter.pending}


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

    def setup(self) -> None:
        # Every read and write on the connection times out after the idle timeout:
        # BaseHTTPRequestHandler then drops the connection (no request, half a request,
        # an idle keep-alive, or a client that stops reading its answer).
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("http %s", format % args)

    def _send(self, status: int, body: dict[str, Any],
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _guard(self, fn: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        try:
            self._send(*fn())
        except BadRequest as exc:
            self._send(400, _error("bad_request", str(exc)))
        except BrokerCallError as exc:
            extra: dict[str, Any] = {"decision": exc.decision} if exc.decision else {}
            headers: tuple[tuple[str, str], ...] = ()
            if exc.http_status == 429:  # say when: from the broker, else a default
                retry = exc.retry_after or DEFAULT_RETRY_AFTER_SECONDS
                extra["retry_after_seconds"] = retry
                headers = (("Retry-After", str(retry)),)
            self._send(exc.http_status, _error(exc.code, exc.message, **extra), headers)
        except Exception:
            _log.exception("unexpected sidecar error")
            self._send(500, _error("internal", "the sidecar failed unexpectedly; its log has "
                                               "the details"))

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if self.path == "/healthz":
            self._guard(self.server.service.health)
        elif self.path == "/openapi.json":
            self._guard(lambda: (200, json.loads(OPENAPI_PATH.read_text())))
        elif path.startswith("/v1/approvals/") and path.count("/") == 3:
            params = urllib.parse.parse_qs(query)
            approval_id = path.rsplit("/", 1)[1]

            def poll() -> tuple[int, dict[str, Any]]:
                if not is_id(approval_id):
                    raise BadRequest(f"the approval id in the path must be {ID_RULE}")
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
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # the body is not read: the stream is out of step
            self._send(400, _error("bad_request", "send the body with a Content-Length; "
                                                  "chunked bodies are not accepted"))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(400, _error("bad_request", "Content-Length must be a non-negative number"))
            return
        if length > _MAX_BODY:
            self.close_connection = True
            self._send(413, _error("too_large", f"body is larger than {_MAX_BODY} bytes"))
            return
        raw = self.rfile.read(length)  # times out after the idle timeout (see setup)
        if len(raw) < length:
            self.close_connection = True  # the client closed its end half-way
            return

        def issue() -> tuple[int, dict[str, Any]]:
            return self.server.service.issue(*parse_issue(raw))

        self._guard(issue)

    def do_DELETE(self) -> None:
        prefix = _PREFIX + "/"
        cid = self.path[len(prefix):] if self.path.startswith(prefix) else ""
        if not cid or "/" in cid:
            self._send(404, _error("not_found", f"use DELETE {_PREFIX}/<credential_id>"))
            return
        if not is_id(cid):
            self._send(400, _error("bad_request", f"the credential id in the path must be "
                                                  f"{ID_RULE}"))
            return
        self._guard(lambda: self.server.service.hand_back(cid))


_BUSY = json.dumps(_error("busy", "the sidecar is serving as many connections as it may; "
                                  "retry in a moment")).encode()
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(_BUSY)).encode() + b"\r\nRetry-After: 1\r\n"
                  b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" + _BUSY)


class SidecarHttpServer(socketserver.ThreadingMixIn, HTTPServer):
    """The HTTP server on the unix socket: one thread per connection, at most
    ``max_connections`` at once, each dropped after ``idle_timeout`` seconds of silence."""

    address_family = socket.AF_UNIX
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # parallel agent calls queue, are never refused

    def __init__(self, path: Path, service: SidecarService, *,
                 idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.service = service
        self.path = path
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
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

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread, or answer 503 at once when all slots are taken.

        Runs in the accepting thread, so it never blocks: the busy answer is a few hundred
        bytes into an empty socket buffer.
        """
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY_RESPONSE)
            except OSError:
                pass
            _log.warning("sidecar busy: a connection was answered 503 (all slots taken)")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # the thread never started
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-answer is not the sidecar's error; never a traceback
        # on stderr for it.
        _log.debug("connection dropped", exc_info=True)

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
