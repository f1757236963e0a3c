"""The agent-facing HTTP/JSON API on a unix socket (README, "The sidecar HTTP API").

``POST /v1/credentials``, ``DELETE /v1/credentials/{id}``, ``GET /healthz``, and
``GET /openapi.json`` (the committed OpenAPI 3.1 document of this API, ``sidecar/openapi.json``).
Every error body is ``{"error": {"code", "message", ...}}``, its status the code's in
``broker.errors.ERRORS``; a 429 carries ``Retry-After``. Tokens are
returned to the agent in the 200 body and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from google.protobuf.timestamp_pb2 import Timestamp
from multidict import CIMultiDict, CIMultiDictProxy

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.errors import DEFAULT_RETRY_AFTER_SECONDS
from broker.wire.inputs import ID_RULE, is_id
from broker.wire.loop import LoopThread
from sidecar.broker_client import BrokerCallError, BrokerClient, decision_to_json
from sidecar.cache import CachedCredential, CredentialCache, request_key
from sidecar.hits import HitReporter

_log = logging.getLogger("credbroker.sidecar")
_MAX_BODY = 64 * 1024
#: The documented body nests two deep ({"initiating_event": {...}}); a little slack.
_MAX_DEPTH = 8
_PREFIX = "/v1/credentials"
_FREEZE = "/v1/freeze"
#: The OpenAPI 3.1 document of this API (client/scripts/generate_openapi.py writes it).
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
#: A connection that sends nothing for this long (no request, half a request, or an idle
#: keep-alive) is closed.
IDLE_TIMEOUT_SECONDS = 10.0
#: Connections served at once; beyond it a new one is answered 503 at once and closed.
MAX_CONNECTIONS = 128
#: Connections the kernel queues before the sidecar accepts them.
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
               "break_glass", "approval_id", "wait_seconds", "environment"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(allowed))}")
    ac = body.get("action_class")
    if not isinstance(ac, str) or not ac.strip():
        raise BadRequest('action_class is required and must be a string, e.g. "enrichment"')
    msg = pb.IssueCredentialRequest(action_class=ac)
    for name in ("target", "justification", "environment"):
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


def parse_freeze(raw: bytes) -> str:
    """The reason ``POST /v1/freeze`` gives. Raises: BadRequest."""
    body = load_json_object(raw)
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: reason")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest('reason is required and must be a string, e.g. {"reason": "prompt '
                         'injection suspected"}')
    return reason


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
    (``sidecar.hits``), which records it as ``credential.reused``. Its request methods are
    coroutines, run on the broker client's loop (``BrokerClient.loop``), as are the
    revocation watch and the hit reporter.
    """

    def __init__(self, client: BrokerClient, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 reporter: HitReporter | None = None) -> None:
        self.client = client
        self.cache = CredentialCache()
        self.reporter = reporter or HitReporter(client.report_cache_hits)
        self._clock = clock
        self.synced = threading.Event()  # set once the first revocation sync arrived
        self._stop: asyncio.Event | None = None
        self._watch: asyncio.Task[None] | None = None
        self._report: asyncio.Task[None] | None = None

    def start_watching(self) -> None:
        """Follow the broker's revocations and scope-map changes (cached credentials that
        died, or were decided under another map, are dropped) and report cache hits: two
        tasks on the client's loop. Call from outside that loop."""
        self.client.loop.run(self._start_tasks(), timeout=10)

    async def _start_tasks(self) -> None:
        stop = self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._watch = loop.create_task(self.client.watch(self.on_revocation_event, stop),
                                       name="watch-revocations")
        self._report = loop.create_task(self.reporter.run(stop), name="report-hits")

    def stop_watching(self, timeout: float = 5.0) -> None:
        """Stop both; wait up to ``timeout`` seconds for the last cache hits to be reported
        (and log loudly what is left). Call from outside the client's loop."""
        if self._stop is not None and self.client.loop.loop.is_running():
            try:
                self.client.loop.run(self._stop_tasks(timeout), timeout=timeout + 5)
            except Exception as exc:  # stopping must go on
                _log.debug("stopping the sidecar's background tasks: %s", exc)
        self.reporter.log_unreported()

    async def _stop_tasks(self, timeout: float) -> None:
        assert self._stop is not None
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()
        if self._report is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._report), timeout)
            self._report.cancel()

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

    async def issue(self, msg: pb.IssueCredentialRequest, wait: int = 0
                    ) -> tuple[int, dict[str, Any]]:
        """Raises: BrokerCallError."""
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
        resp = await self.client.issue(msg)
        if not resp.HasField("credential") and resp.HasField("approval"):
            if wait:
                return await self.await_approval(resp.approval.id, wait)
            return 202, _pending(resp)
        return self._credential(resp, key, now)

    async def await_approval(self, approval_id: str, wait: int) -> tuple[int, dict[str, Any]]:
        """Raises: BrokerCallError."""
        resp = await self.client.await_approval(approval_id, wait)
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
        if cred.environment:  # the environment whose Vault the token works in
            body["environment"] = cred.environment
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

    async def hand_back(self, credential_id: str) -> tuple[int, dict[str, Any]]:
        """Revoke the credential, and forget it first: identical requests answered with the
        same cached credential lose it too, and the next one gets a fresh credential.

        Raises: BrokerCallError.
        """
        self.cache.drop(credential_id)
        resp = await self.client.revoke(credential_id, "handed back by the agent")
        _log.info("handed back credential_id=%s already_dead=%s", credential_id,
                  resp.already_dead)
        return 200, {"credential_id": credential_id, "revoked": not resp.already_dead,
                     "already_dead": resp.already_dead}

    async def freeze_self(self, reason: str) -> tuple[int, dict[str, Any]]:
        """Freeze this workload's own identity at once (the broker makes Vault refuse every
        credential of it); drop everything cached first. It cannot be undone from here.

        Raises: BrokerCallError.
        """
        self.cache.clear()
        resp = await self.client.freeze_self(reason)
        fz = resp.freeze
        _log.warning("this workload froze itself (freeze %s): %s", fz.id, reason[:200])
        return 200, {"frozen": True, "freeze_id": fz.id, "spiffe_id": fz.pattern, "by": fz.by,
                     "reason": fz.reason,
                     "frozen_at": _rfc3339(fz.created_at.ToDatetime(tzinfo=UTC)),
                     "credentials_matched": resp.credentials_matched,
                     "vault_enforced": not resp.vault_pending}

    async def health(self) -> tuple[int, dict[str, Any]]:
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


def _json_response(status: int, body: dict[str, Any],
                   headers: tuple[tuple[str, str], ...] = (), *,
                   close: bool = False) -> web.Response:
    resp = web.Response(status=status, body=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json",
                                 "Cache-Control": "no-store", **dict(headers)})
    if close:
        resp.force_close()
    return resp


@functools.cache
def busy_response() -> bytes:
    """The whole HTTP answer to a connection over the limit, written straight to its
    socket (built once, at first use: nothing of this module runs at import)."""
    body = json.dumps(_error("busy", "the sidecar is serving as many connections as it may; "
                                     "retry in a moment")).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nRetry-After: 1\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" + body)

Answer = tuple[int, dict[str, Any]]


class _HostOptionalParser(HttpRequestParserPy):
    """aiohttp's request parser, taking an HTTP/1.1 request without ``Host`` as for this host.

    On a unix socket the Host header names nothing, and agents' minimal HTTP clients (and
    the sidecar's contract so far) leave it out; aiohttp would refuse such a request.
    """

    def parse_headers(self, lines: list[bytes]) -> Any:
        headers, raw, *rest = super().parse_headers(lines)
        if hdrs.HOST not in headers:
            headers = CIMultiDictProxy(CIMultiDict([*headers.items(), (hdrs.HOST, "sidecar")]))
        return (headers, raw, *rest)


class _Connection(RequestHandler):
    """One HTTP connection: a request the HTTP parser refuses gets our JSON error body too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = _HostOptionalParser(
            self, self._loop, self._read_bufsize, payload_exception=RequestPayloadError,
            max_msg_queue_size=self._max_msg_queue_size)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer is out: nothing to add
            raise ConnectionError("an answer was being sent; the connection is dropped")
        if status >= 500:
            _log.error("unexpected sidecar error", exc_info=exc)
            body = _error("internal", "the sidecar failed unexpectedly; its log has the "
                                      "details")
        else:
            reason = getattr(exc, "message", None) or message or str(exc)
            _log.debug("malformed HTTP request: %s", reason)
            body = _error("bad_request", f"malformed HTTP request ({' '.join(reason.split())}"
                                         "); send HTTP/1.1 with a Host header, and a body with "
                                         "a Content-Length (chunked bodies are not accepted)")
        return _json_response(status if 400 <= status < 600 else 400, body, close=True)


class _BoundedServer(web.Server):
    """aiohttp's low-level server, answering 503 at once beyond ``max_connections``."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._max_connections = max_connections

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport
                        ) -> None:
        # A connection holds its slot until its handler task has finished (aiohttp drops it
        # from ``_connections`` then), as a thread of the sync server held it.
        if len(self._connections) >= self._max_connections:
            transport.write(busy_response())  # a few hundred bytes into an empty buffer
            transport.close()
            _log.warning("sidecar busy: a connection was answered 503 (all slots taken)")
            return
        super().connection_made(handler, transport)

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class SidecarHttpServer:
    """The HTTP server on the unix socket: aiohttp on an asyncio loop in a thread.

    The loop is ``loop`` when given (the sidecar passes ``BrokerClient.loop``, so the
    handlers ``await`` the broker calls on the loop their channel lives on), else one of
    its own. At most ``max_connections`` connections at once (beyond, a quick 503
    ``busy``); a connection that sends nothing for ``idle_timeout`` seconds (no request,
    half the headers, half a body, an idle keep-alive) is closed. The service's methods
    are coroutines, awaited on the loop: no thread is used per request.
    """

    def __init__(self, path: Path, service: SidecarService, *,
                 idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                 max_connections: int = MAX_CONNECTIONS,
                 loop: LoopThread | None = None) -> None:
        self.service = service
        self.path = path
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._own_loop = loop is None
        self._loop = loop if loop is not None else LoopThread("sidecar-http")
        self._runner: web.ServerRunner | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        # Bound now (as the socketserver did): the socket exists when the constructor
        # returns; it listens from serve_in_thread().
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o660)
        self._loop.run(self._setup(), timeout=10)

    async def _setup(self) -> None:
        server = _BoundedServer(self._handle, max_connections=self.max_connections,
                                keepalive_timeout=self.idle_timeout, access_log=None,
                                lingering_time=0)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()

    async def _listen(self) -> None:
        assert self._runner is not None
        await web.SockSite(self._runner, self._sock, backlog=LISTEN_BACKLOG).start()

    def serve_in_thread(self) -> None:
        """Start answering on the socket (on the loop's thread); returns at once."""
        self._loop.run(self._listen(), timeout=10)

    def close(self) -> None:
        """Stop answering (requests in flight get a second), and stop the loop if it is the
        server's own."""
        if self._runner is not None:
            if self._loop.loop.is_running():
                try:
                    self._loop.run(self._runner.cleanup(), timeout=10)
                except Exception as exc:  # closing must go on
                    _log.debug("stopping the HTTP server: %s", exc)
            self._runner = None
        self._sock.close()
        if self._own_loop:
            self._loop.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # -- requests

    async def _guard(self, fn: Callable[..., Awaitable[Answer]], *args: Any) -> web.Response:
        try:
            return _json_response(*await fn(*args))
        except BadRequest as exc:
            return _json_response(400, _error("bad_request", str(exc)))
        except BrokerCallError as exc:
            extra: dict[str, Any] = {"decision": exc.decision} if exc.decision else {}
            headers: tuple[tuple[str, str], ...] = ()
            if exc.http_status == 429:  # say when: from the broker, else a default
                retry = exc.retry_after or DEFAULT_RETRY_AFTER_SECONDS
                extra["retry_after_seconds"] = retry
                headers = (("Retry-After", str(retry)),)
            return _json_response(exc.http_status, _error(exc.code, exc.message, **extra),
                                  headers)
        except Exception:
            _log.exception("unexpected sidecar error")
            return _json_response(500, _error("internal", "the sidecar failed unexpectedly; "
                                                          "its log has the details"))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        target = request.raw_path
        if request.method == "GET":
            return await self._get(target)
        if request.method == "POST":
            return await self._post(request, target)
        if request.method == "DELETE":
            return await self._delete(target)
        return _json_response(404, _error("not_found", f"no such endpoint {request.method} "
                                                       f"{target}; try POST {_PREFIX} or "
                                                       "GET /healthz"))

    async def _get(self, target: str) -> web.Response:
        path, _, query = target.partition("?")
        if target == "/healthz":
            return await self._guard(self.service.health)
        if target == "/openapi.json":  # the contract, for agents in other languages
            return _json_response(200, json.loads(OPENAPI_PATH.read_text()))
        if path.startswith("/v1/approvals/") and path.count("/") == 3:
            params = urllib.parse.parse_qs(query)
            approval_id = path.rsplit("/", 1)[1]
            if not is_id(approval_id):
                return _json_response(400, _error(
                    "bad_request", f"the approval id in the path must be {ID_RULE}"))
            raw = params.get("wait", ["0"])[0]
            if not raw.isdigit():
                return _json_response(400, _error(
                    "bad_request", "wait must be a whole number of seconds from 0 to 60"))
            try:
                wait = wait_seconds(int(raw))
            except BadRequest as exc:
                return _json_response(400, _error("bad_request", str(exc)))
            return await self._guard(self.service.await_approval, approval_id, wait)
        return _json_response(404, _error("not_found", f"no such endpoint GET {target}; "
                                                       "try POST /v1/credentials or GET "
                                                       "/healthz"))

    async def _post(self, request: web.BaseRequest, target: str) -> web.StreamResponse:
        if target not in (_PREFIX, _FREEZE):
            return _json_response(404, _error("not_found", f"no such endpoint POST {target}; "
                                                           f"use POST {_PREFIX}"))
        if request.headers.get("Transfer-Encoding"):
            # The body is not read: the stream is out of step.
            return _json_response(400, _error("bad_request", "send the body with a "
                                                             "Content-Length; chunked bodies "
                                                             "are not accepted"), close=True)
        length = request.content_length or 0
        if length > _MAX_BODY:
            return _json_response(413, _error("too_large",
                                              f"body is larger than {_MAX_BODY} bytes"),
                                  close=True)
        try:
            # An empty body is read as b"" (aiohttp's empty stream refuses readexactly(0)),
            # so it is answered with a 400 that says what to send, not a dropped connection.
            raw = await asyncio.wait_for(request.content.readexactly(length),
                                         self.idle_timeout) if length else b""
        except (TimeoutError, asyncio.IncompleteReadError):
            # Half a body, then silence (or the client closed its end half-way): drop it.
            request.protocol.force_close()
            raise web.HTTPRequestTimeout() from None
        if target == _FREEZE:
            try:
                reason = parse_freeze(raw)
            except BadRequest as exc:
                return _json_response(400, _error("bad_request", str(exc)))
            return await self._guard(self.service.freeze_self, reason)
        try:
            msg, wait = parse_issue(raw)
        except BadRequest as exc:
            return _json_response(400, _error("bad_request", str(exc)))
        return await self._guard(self.service.issue, msg, wait)

    async def _delete(self, target: str) -> web.Response:
        prefix = _PREFIX + "/"
        cid = target[len(prefix):] if target.startswith(prefix) else ""
        if not cid or "/" in cid:
            return _json_response(404, _error("not_found",
                                              f"use DELETE {_PREFIX}/<credential_id>"))
        if not is_id(cid):
            return _json_response(400, _error("bad_request", f"the credential id in the path "
                                                             f"must be {ID_RULE}"))
        return await self._guard(self.service.hand_back, cid)
