"""The sidecar's HTTP API, exactly as the agent sees it (issue #18, mutation testing of
``sidecar/app.py``): the real ``SidecarService`` behind the real ``SidecarHttpServer`` on a
real unix socket, the broker a stand-in at the ``BrokerClient`` boundary (as in
``test_record_of_hits.py``) that records every call the sidecar makes.

Each test pins one mechanism by what the agent receives (status, headers, the whole JSON
body), what the broker was asked (method and arguments), what the cache holds afterwards,
and what the log says (never a token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.errors import DEFAULT_RETRY_AFTER_SECONDS
from broker.wire.inputs import ID_RULE
from broker.wire.loop import LoopThread
from sidecar.app import OPENAPI_PATH, BadRequest, SidecarHttpServer, SidecarService
from sidecar.broker_client import BrokerCallError, BrokerClient
from sidecar.hits import HitReporter

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=1)
V1 = "sha256:one"
SID = "spiffe://example.org/agent/triage"
EVENT = {"source": "splunk", "id": "N-1", "summary": "beacon"}
ASK = {"action_class": "enrichment", "target": "h1", "justification": "enrich the alert",
       "initiating_event": EVENT}
NOT_FOUND_HINT = "try POST /v1/credentials or GET /healthz"


def _ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


class Broker:
    """The broker as the sidecar's ``BrokerClient`` presents it; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.minted = 0
        self.version = V1
        self.needs_approval = False  # IssueCredential answers "approval pending"
        self.granted = False  # AwaitApproval answers with the credential
        self.with_approval = False  # the credential answer carries its approval
        self.not_reusable = False
        self.environment = ""
        self.no_decision = False
        self.error: Exception | None = None
        self.already_dead = False
        self.sid_error: Exception | None = None
        self.down = False
        self.reported: list[pb.CacheHit] = []

    @property
    def spiffe_id(self) -> str:
        if self.sid_error is not None:
            raise self.sid_error
        return SID

    def _decision(self, action_class: str, outcome: int = pb.OUTCOME_ALLOW) -> pb.Decision:
        return pb.Decision(outcome=outcome, action_class=action_class,  # type: ignore[arg-type]
                           rule="enrichment.workloads[0]", reasons=["allowed"],
                           scope_map_version=self.version, not_reusable=self.not_reusable,
                           spiffe_id=SID)

    def _approval(self, action_class: str, state: str) -> pb.ApprovalInfo:
        return pb.ApprovalInfo(
            id="apr-1", state=state, action_class=action_class, approvers=["soc-leads"],
            approvals_required=2, votes=[pb.ApprovalVote(subject="alice")],
            expires_at=_ts(T0 + timedelta(minutes=15)))

    def _credential(self, action_class: str) -> pb.IssueCredentialResponse:
        self.minted += 1
        n = self.minted
        resp = pb.IssueCredentialResponse(
            request_id=f"req-{n}",
            credential=pb.Credential(
                credential_id=f"acc{n}", token=f"hvs.SECRET-{n}",
                policies=["credbroker-enrichment", "credbroker-base"], ttl_seconds=120,
                expires_at=_ts(T0 + timedelta(seconds=120)), environment=self.environment))
        if not self.no_decision:
            resp.decision.CopyFrom(self._decision(action_class))
        if self.with_approval:
            resp.approval.CopyFrom(self._approval(action_class, "used"))
        return resp

    def _pending(self, action_class: str) -> pb.IssueCredentialResponse:
        resp = pb.IssueCredentialResponse(
            request_id="req-pending", approval=self._approval(action_class, "pending"))
        if not self.no_decision:
            resp.decision.CopyFrom(self._decision(action_class, pb.OUTCOME_NEEDS_APPROVAL))
        return resp

    async def issue(self, msg: pb.IssueCredentialRequest) -> pb.IssueCredentialResponse:
        self.calls.append(("issue", msg))
        if self.error is not None:
            raise self.error
        if self.needs_approval:
            return self._pending(msg.action_class)
        return self._credential(msg.action_class)

    async def await_approval(self, approval_id: str, wait_seconds: int
                             ) -> pb.IssueCredentialResponse:
        self.calls.append(("await_approval", (approval_id, wait_seconds)))
        if self.error is not None:
            raise self.error
        if self.granted:
            self.with_approval = True
            return self._credential("containment")
        return self._pending("containment")

    async def revoke(self, credential_id: str, reason: str) -> pb.RevokeCredentialResponse:
        self.calls.append(("revoke", (credential_id, reason)))
        if self.error is not None:
            raise self.error
        return pb.RevokeCredentialResponse(credential_id=credential_id,
                                           already_dead=self.already_dead)

    async def freeze_self(self, reason: str) -> pb.FreezeResponse:
        self.calls.append(("freeze_self", reason))
        if self.error is not None:
            raise self.error
        return pb.FreezeResponse(
            freeze=pb.FreezeInfo(id="fz-1", kind="spiffe_id", pattern=SID, reason=reason,
                                 by=SID, created_at=_ts(T0 + timedelta(seconds=5))),
            credentials_matched=3, vault_pending=self.down)

    async def report_cache_hits(self, hits: list[pb.CacheHit]) -> pb.ReportCacheHitsResponse:
        self.calls.append(("report_cache_hits", len(hits)))
        if self.down:
            raise BrokerCallError(503, "broker_unavailable", "the broker is unreachable")
        self.reported.extend(hits)
        return pb.ReportCacheHitsResponse(recorded=len(hits))

    def asked(self, method: str) -> list[Any]:
        return [args for name, args in self.calls if name == method]


def _service(broker: Broker, capacity: int = 1000) -> SidecarService:
    reporter = HitReporter(broker.report_cache_hits, capacity=capacity)
    return SidecarService(cast(BrokerClient, broker), clock=lambda: NOW, reporter=reporter)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cbx-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Sidecar:
    """A served sidecar and a raw HTTP/1.1 client for it."""

    def __init__(self, sock_dir: Path, broker: Broker | None = None, **kw: Any) -> None:
        self.broker = broker or Broker()
        self.service = _service(self.broker)
        self.http = SidecarHttpServer(sock_dir / "s.sock", self.service, **kw)
        self.http.serve_in_thread()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(self.http.path))
        return s

    def raw(self, data: bytes, *, see_close: bool = False
            ) -> tuple[int, dict[str, str], bytes, bool]:
        """Send ``data``; the answer's status, headers (lower-case names), body, and (with
        ``see_close``) whether the sidecar then closed the connection."""
        with self.connect() as s:
            s.sendall(data)
            status, headers, body = read_answer(s)
            closed = False
            if see_close:
                s.settimeout(5)
                try:
                    closed = s.recv(1) == b""
                except TimeoutError:
                    closed = False
            return status, headers, body, closed

    def call(self, method: str, target: str, body: Any = None,
             raw_body: bytes | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        payload = raw_body if raw_body is not None else (
            b"" if body is None else json.dumps(body).encode())
        head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if method in ("POST", "PUT"):
            head += f"Content-Length: {len(payload)}\r\n"
        status, headers, data, _ = self.raw(head.encode() + b"\r\n" + payload)
        return status, json.loads(data), headers

    def close(self) -> None:
        self.http.close()


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def sidecar(sock_dir: Path) -> Iterator[Sidecar]:
    sc = Sidecar(sock_dir)
    yield sc
    sc.close()


def _err(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _decision_json(action_class: str = "enrichment", outcome: str = "allow") -> dict[str, Any]:
    return {"outcome": outcome, "action_class": action_class,
            "rule": "enrichment.workloads[0]", "reasons": ["allowed"],
            "owner": {"team": "", "contact": ""}, "escalation": [], "scope_map_version": V1,
            "source": "", "risk": "", "spiffe_id": SID}


def _approval_json(action_class: str, state: str) -> dict[str, Any]:
    return {"approval_id": "apr-1", "status": state, "action_class": action_class,
            "approvers": ["soc-leads"], "approvals_required": 2, "approved_by": ["alice"],
            "expires_at": "2026-11-27T12:15:00Z"}


def _minted_body(n: int = 1, action_class: str = "enrichment") -> dict[str, Any]:
    return {"credential_id": f"acc{n}", "token": f"hvs.SECRET-{n}",
            "expires_at": "2026-11-27T12:02:00Z", "ttl_seconds": 120,
            "action_class": action_class,
            "policies": ["credbroker-enrichment", "credbroker-base"],
            "request_id": f"req-{n}", "decision": _decision_json(action_class)}


# -- POST /v1/credentials ----------------------------------------------------------------


def test_a_credential_answer_is_the_whole_documented_body(sidecar: Sidecar,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    with caplog.at_level(logging.DEBUG):
        status, body, headers = sidecar.call("POST", "/v1/credentials", ASK)
    assert status == 200
    assert body == {**_minted_body(), "cached": False}
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    (sent,) = sidecar.broker.asked("issue")
    assert sent == pb.IssueCredentialRequest(
        action_class="enrichment", target="h1", justification="enrich the alert",
        initiating_event=pb.InitiatingEvent(**EVENT))
    assert ("issued credential_id=acc1 action_class=enrichment request_id=req-1"
            in caplog.messages)
    assert not any("SECRET" in r.getMessage() for r in caplog.records)


def test_the_same_request_again_is_answered_from_the_cache_and_reported(
        sidecar: Sidecar, caplog: pytest.LogCaptureFixture) -> None:
    sidecar.call("POST", "/v1/credentials", ASK)
    with caplog.at_level(logging.INFO, logger="credbroker.sidecar"):
        status, body, _ = sidecar.call("POST", "/v1/credentials", ASK)
    assert status == 200
    rid = body["request_id"]
    assert body == {**_minted_body(), "request_id": rid, "minted_request_id": "req-1",
                    "cached": True}
    assert len(rid) == 32 and rid != "req-1"
    assert len(sidecar.broker.asked("issue")) == 1
    assert f"served cached credential_id=acc1 request_id={rid}" in caplog.messages
    assert not any("SECRET" in r.getMessage() for r in caplog.records)
    assert sidecar.service.reporter.pending == 1
    assert sidecar.http._loop.run(sidecar.service.reporter.flush_once())
    (hit,) = sidecar.broker.reported
    assert hit.credential_id == "acc1" and hit.request_id == rid
    assert hit.served_at.ToDatetime(tzinfo=UTC) == NOW
    assert hit.request == sidecar.broker.asked("issue")[0]


def test_a_requested_ttl_is_passed_to_the_cache_rule() -> None:
    """A cached credential with 119 s left answers a request for 119 s, not for 120 s."""
    broker = Broker()
    sc = _service(broker)
    asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="enrichment")))
    _status, body = asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="enrichment",
                                                                  ttl_seconds=119)))
    assert len(broker.asked("issue")) == 2  # another request: another key
    asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="enrichment",
                                                   ttl_seconds=119)))
    assert len(broker.asked("issue")) == 2 and body["cached"] is False
    big = pb.IssueCredentialRequest(action_class="enrichment", ttl_seconds=200)
    asyncio.run(sc.issue(big))
    asyncio.run(sc.issue(big))
    assert len(broker.asked("issue")) == 4  # 119 s left never fits 200 s


def test_with_unreported_hits_piling_up_the_broker_is_asked_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.down = True
    reporter = HitReporter(broker.report_cache_hits, capacity=1)
    sc = SidecarService(cast(BrokerClient, broker), clock=lambda: NOW, reporter=reporter)
    req = pb.IssueCredentialRequest(action_class="enrichment")
    asyncio.run(sc.issue(req))
    assert asyncio.run(sc.issue(req))[1]["cached"] is True
    with caplog.at_level(logging.WARNING, logger="credbroker.sidecar"):
        status, body = asyncio.run(sc.issue(req))
    assert status == 200 and body["cached"] is False and body["credential_id"] == "acc2"
    assert ("1 cache hits await reporting to the broker: asking the broker instead of "
            "answering from the cache") in caplog.messages


def test_a_credential_in_another_environment_says_which() -> None:
    broker = Broker()
    broker.environment = "prod"
    _status, body = asyncio.run(_service(broker).issue(
        pb.IssueCredentialRequest(action_class="enrichment")))
    assert body == {**_minted_body(), "environment": "prod", "cached": False}


def test_a_time_dependent_decision_is_not_cached() -> None:
    broker = Broker()
    broker.not_reusable = True
    sc = _service(broker)
    req = pb.IssueCredentialRequest(action_class="enrichment")
    asyncio.run(sc.issue(req))
    assert len(sc.cache) == 0
    assert asyncio.run(sc.issue(req))[1]["credential_id"] == "acc2"


def test_a_credential_released_by_an_approval_carries_it_and_is_not_cached() -> None:
    broker = Broker()
    broker.with_approval = True
    sc = _service(broker)
    req = pb.IssueCredentialRequest(action_class="enrichment")
    status, body = asyncio.run(sc.issue(req))
    assert status == 200
    assert body == {**_minted_body(), "approval": _approval_json("enrichment", "used"),
                    "cached": False}
    assert len(sc.cache) == 0


@pytest.mark.parametrize("fields", [{"approval_id": "apr-1"}, {"break_glass": True}])
def test_approved_or_break_glass_requests_never_touch_the_cache(fields: dict[str, Any]
                                                                ) -> None:
    broker = Broker()
    sc = _service(broker)
    plain = pb.IssueCredentialRequest(action_class="enrichment")
    asyncio.run(sc.issue(plain))  # cached
    asked = pb.IssueCredentialRequest(action_class="enrichment", **fields)
    _, body = asyncio.run(sc.issue(asked))
    assert body["credential_id"] == "acc2" and body["cached"] is False
    assert len(sc.cache) == 1 and sc.cache.holds("acc1") and not sc.cache.holds("acc2")


def test_an_approval_pending_is_a_202_that_says_where_to_poll(sidecar: Sidecar) -> None:
    sidecar.broker.needs_approval = True
    status, body, _ = sidecar.call("POST", "/v1/credentials",
                                   {"action_class": "containment"})
    assert status == 202
    assert body == {**_approval_json("containment", "pending"),
                    "poll": "/v1/approvals/apr-1?wait=30", "request_id": "req-pending",
                    "decision": _decision_json("containment", "needs_approval")}
    assert sidecar.broker.asked("await_approval") == []


def test_a_pending_answer_without_a_decision_has_no_decision_key() -> None:
    broker = Broker()
    broker.needs_approval = True
    broker.no_decision = True
    status, body = asyncio.run(_service(broker).issue(
        pb.IssueCredentialRequest(action_class="containment")))
    assert status == 202 and "decision" not in body
    assert body["poll"] == "/v1/approvals/apr-1?wait=30"


def test_wait_seconds_waits_for_the_approval_at_the_broker(sidecar: Sidecar) -> None:
    sidecar.broker.needs_approval = True
    sidecar.broker.granted = True
    status, body, _ = sidecar.call("POST", "/v1/credentials",
                                   {"action_class": "containment", "wait_seconds": 7})
    assert sidecar.broker.asked("await_approval") == [("apr-1", 7)]
    assert status == 200
    assert body == {**_minted_body(1, "containment"),
                    "approval": _approval_json("containment", "used"), "cached": False}
    assert len(sidecar.service.cache) == 0


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"action_class": "a", "wait_seconds": 61}',
     "wait_seconds must be a whole number of seconds from 0 to 60"),
    (b'{"action_class": "a", "wait_seconds": -1}',
     "wait_seconds must be a whole number of seconds from 0 to 60"),
    (b'{"action_class": "a", "wait_seconds": true}',
     "wait_seconds must be a whole number of seconds from 0 to 60"),
    (b'{"action_class": "a", "target": 5}', "target must be a string"),
    (b'{"action_class": "a", "environment": 5}', "environment must be a string"),
    (b'{"action_class": "a", "break_glass": "yes"}', "break_glass must be true or false"),
    (b'{"action_class": "a", "approval_id": 5}',
     f"approval_id must be the id a 202 answer gave you ({ID_RULE})"),
    (b'{"action_class": "a", "ttl_seconds": 0}',
     "ttl_seconds must be a positive integer number of seconds"),
    (b'{"action_class": "a", "ttl_seconds": 1.5}',
     "ttl_seconds must be a positive integer number of seconds"),
    (b'{"action_class": "a", "initiating_event": "x"}',
     'initiating_event must be {"source": str, "id": str, "summary": str (optional)}'),
    (b'{"action_class": "a", "initiating_event": {"summary": 3}}',
     "initiating_event.summary must be a string"),
    (b'{"action_class": "   "}', 'action_class is required and must be a string, e.g. '
                                 '"enrichment"'),
    (b'{"x": 1, "action_class": "a", "b": 2}',
     "unknown field(s) b, x; allowed: action_class, approval_id, break_glass, environment, "
     "initiating_event, justification, target, ttl_seconds, wait_seconds"),
    (b"", 'send a JSON object, e.g. {"action_class": "enrichment"}'),
    (b"{", "the body is not valid JSON (Expecting property name enclosed in double quotes at "
           "character 1)"),
    (b"\xff", "the body is not valid JSON: it is not UTF-8 (invalid start byte at byte 0)"),
    (b'{"a": ' * 5 + b'{"b": [[[[1]]]]}' + b"}" * 5,
     'the body nests arrays or objects more than 8 deep; send a flat JSON object, e.g. '
     '{"action_class": "enrichment"}'),
    (b'{"action_class": NaN}', "NaN is not a JSON number; send whole numbers only"),
    (b"XXXXXXXXXX", "the body is not valid JSON (Expecting value at character 0)"),
    (b'{"action_class": "a", "ttl_seconds": ' + b"9" * 5000 + b"}",
     "the body is not acceptable JSON (ValueError: Exceeds the limit (4300 digits) for "
     "integer string conversion: value has 5000 digits; use sys.set_in)"),
    (b'{"action_class": "\\udc00"}', 'a string in the body holds a lone UTF-16 surrogate '
                                      '(such as "\\ud800"), which is not text; send valid '
                                      "Unicode"),
])
def test_a_bad_body_is_a_400_that_says_what_to_send(sidecar: Sidecar, raw: bytes,
                                                    message: str) -> None:
    status, body, headers = sidecar.call("POST", "/v1/credentials", raw_body=raw)
    assert (status, body) == (400, _err("bad_request", message))
    assert headers["cache-control"] == "no-store"
    assert sidecar.broker.calls == []


def test_a_body_nesting_exactly_eight_deep_is_accepted() -> None:
    from sidecar.app import load_json_object
    text = b'{"a": ' * 7 + b"[1]" + b"}" * 7
    assert load_json_object(text)["a"]["a"]["a"]["a"]["a"]["a"]["a"] == [1]


def test_every_field_of_the_body_reaches_the_broker(sidecar: Sidecar) -> None:
    sidecar.call("POST", "/v1/credentials", {
        "action_class": "enrichment", "target": "h1", "justification": "j",
        "environment": "prod", "ttl_seconds": 2**40, "approval_id": "apr-9",
        "break_glass": False, "wait_seconds": 0,
        "initiating_event": {"source": "s", "id": "i"}})
    (sent,) = sidecar.broker.asked("issue")
    assert sent == pb.IssueCredentialRequest(
        action_class="enrichment", target="h1", justification="j", environment="prod",
        ttl_seconds=2**31, approval_id="apr-9",
        initiating_event=pb.InitiatingEvent(source="s", id="i"))
    assert sent.HasField("initiating_event")


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(sidecar: Sidecar
                                                                      ) -> None:
    base = b'{"action_class": "enrichment", "justification": ""}'
    raw = base[:-2] + b"j" * (65536 - len(base)) + b'"}'
    assert len(raw) == 65536
    status, body, _ = sidecar.call("POST", "/v1/credentials", raw_body=raw)
    assert status == 200 and body["credential_id"] == "acc1"
    assert len(sidecar.broker.asked("issue")[0].justification) == 65536 - len(base)
    # The whole body sent at once (nothing is left unread in the stream): the sidecar
    # closes the connection all the same.
    status, _headers, data, closed = sidecar.raw(
        b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n"
        + b" " * 65537, see_close=True)
    assert (status, json.loads(data)) == (413, _err("too_large",
                                                    "body is larger than 65536 bytes"))
    assert closed


def test_a_chunked_body_is_refused_with_the_connection_closed(sidecar: Sidecar) -> None:
    status, _, data, closed = sidecar.raw(
        b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n", see_close=True)
    assert (status, json.loads(data)) == (400, _err(
        "bad_request", "send the body with a Content-Length; chunked bodies are not accepted"))
    assert closed and sidecar.broker.calls == []


def test_keep_alive_answers_leave_the_connection_open(sidecar: Sidecar) -> None:
    with sidecar.connect() as s:
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(s)[0] == 200


def test_half_a_body_then_silence_is_dropped_without_asking_the_broker(
        sock_dir: Path) -> None:
    sc = Sidecar(sock_dir, idle_timeout=0.3)
    try:
        with sc.connect() as s:
            s.sendall(b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n"
                      b'{"action_class"')
            s.settimeout(5)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert b"200 OK" not in data
        assert sc.broker.calls == []
    finally:
        sc.close()


# -- the broker's refusals, passed on -----------------------------------------------------


def test_a_broker_refusal_keeps_its_status_code_message_and_decision(sidecar: Sidecar
                                                                     ) -> None:
    decision = _decision_json(outcome="deny")
    sidecar.broker.error = BrokerCallError(403, "denied_by_policy", "no rule allows it; ask "
                                           "the owner", decision)
    status, body, headers = sidecar.call("POST", "/v1/credentials", ASK)
    assert (status, body) == (403, _err("denied_by_policy", "no rule allows it; ask the owner",
                                        decision=decision))
    assert "retry-after" not in headers


def test_a_refusal_without_a_decision_has_no_decision_key(sidecar: Sidecar) -> None:
    sidecar.broker.error = BrokerCallError(503, "broker_unavailable", "retry later")
    status, body, headers = sidecar.call("POST", "/v1/credentials", ASK)
    assert (status, body) == (503, _err("broker_unavailable", "retry later"))
    assert "retry-after" not in headers


@pytest.mark.parametrize(("retry_after", "said"), [(7, 7), (None, DEFAULT_RETRY_AFTER_SECONDS)])
def test_a_429_says_when_to_retry_in_header_and_body(sidecar: Sidecar, retry_after: int | None,
                                                     said: int) -> None:
    sidecar.broker.error = BrokerCallError(429, "rate_limited", "slow down", None, retry_after)
    status, body, headers = sidecar.call("POST", "/v1/credentials", ASK)
    assert (status, body) == (429, _err("rate_limited", "slow down", retry_after_seconds=said))
    assert headers["retry-after"] == str(said)


def test_an_unexpected_failure_is_a_500_that_points_at_the_log(
        sidecar: Sidecar, caplog: pytest.LogCaptureFixture) -> None:
    sidecar.broker.error = RuntimeError("boom hvs.SECRET-x")
    with caplog.at_level(logging.ERROR, logger="credbroker.sidecar"):
        status, body, _ = sidecar.call("POST", "/v1/credentials", ASK)
    assert (status, body) == (500, _err(
        "internal", "the sidecar failed unexpectedly; its log has the details"))
    (rec,) = [r for r in caplog.records if r.getMessage() == "unexpected sidecar error"]
    assert rec.exc_info is not None and rec.levelno == logging.ERROR


# -- GET ----------------------------------------------------------------------------------


def test_health_names_the_identity_and_counts(sidecar: Sidecar) -> None:
    sidecar.call("POST", "/v1/credentials", ASK)
    status, body, headers = sidecar.call("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok", "spiffe_id": SID, "cached_credentials": 1,
                                    "unreported_cache_hits": 0})
    assert headers["content-type"] == "application/json"


def test_health_without_an_svid_is_a_503_that_says_why(sidecar: Sidecar) -> None:
    sidecar.broker.sid_error = FileNotFoundError("no socket")
    status, body, _ = sidecar.call("GET", "/healthz")
    assert (status, body) == (503, _err("workload_api_unavailable",
                                        "no SVID from the Workload API (FileNotFoundError)"))


def test_a_request_without_a_host_header_is_served(sidecar: Sidecar) -> None:
    status, _, data, _ = sidecar.raw(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == 200 and json.loads(data)["status"] == "ok"
    status, _, data, _ = sidecar.raw(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status == 200


def test_the_openapi_document_is_served_as_committed(sidecar: Sidecar) -> None:
    status, body, headers = sidecar.call("GET", "/openapi.json")
    assert status == 200 and body == json.loads(OPENAPI_PATH.read_text())
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("target", ["/healthz?x=1", "/healthz/", "/openapi.json?v=1",
                                    "/v1/approvals/apr-1/x", "/v1/approvals", "/v2/approvals/a",
                                    "/x/v1/approvals/a", "/v1/credentials"])
def test_other_gets_are_404s_that_name_the_endpoints(sidecar: Sidecar, target: str) -> None:
    status, body, _ = sidecar.call("GET", target)
    assert (status, body) == (404, _err("not_found", f"no such endpoint GET {target}; "
                                                     f"{NOT_FOUND_HINT}"))
    assert sidecar.broker.calls == []


@pytest.mark.parametrize(("target", "wait"), [
    ("/v1/approvals/apr-1", 0), ("/v1/approvals/apr-1?wait=5", 5),
    ("/v1/approvals/apr-1?wait=60", 60), ("/v1/approvals/apr-1?x=1&wait=0", 0),
    ("/v1/approvals/apr-1?wait=3&wait=9", 3)])
def test_polling_an_approval_asks_the_broker_for_it(sidecar: Sidecar, target: str,
                                                    wait: int) -> None:
    status, body, _ = sidecar.call("GET", target)
    assert sidecar.broker.asked("await_approval") == [("apr-1", wait)]
    assert status == 202
    assert body == {**_approval_json("containment", "pending"),
                    "poll": "/v1/approvals/apr-1?wait=30", "request_id": "req-pending",
                    "decision": _decision_json("containment", "needs_approval")}


def test_a_granted_approval_answers_with_the_credential_uncached(sidecar: Sidecar) -> None:
    sidecar.broker.granted = True
    status, body, _ = sidecar.call("GET", "/v1/approvals/apr-1?wait=1")
    assert status == 200
    assert body == {**_minted_body(1, "containment"),
                    "approval": _approval_json("containment", "used"), "cached": False}
    assert len(sidecar.service.cache) == 0


@pytest.mark.parametrize(("target", "message"), [
    ("/v1/approvals/apr-1?wait=x", "wait must be a whole number of seconds from 0 to 60"),
    ("/v1/approvals/apr-1?wait=-1", "wait must be a whole number of seconds from 0 to 60"),
    ("/v1/approvals/apr-1?wait=61", "wait_seconds must be a whole number of seconds from 0 to "
                                    "60"),
    ("/v1/approvals/apr!1", f"the approval id in the path must be {ID_RULE}"),
    ("/v1/approvals/", f"the approval id in the path must be {ID_RULE}"),
])
def test_a_bad_poll_is_a_400_that_says_what_to_send(sidecar: Sidecar, target: str,
                                                    message: str) -> None:
    status, body, _ = sidecar.call("GET", target)
    assert (status, body) == (400, _err("bad_request", message))
    assert sidecar.broker.calls == []


def test_a_broker_refusal_of_a_poll_is_passed_on(sidecar: Sidecar) -> None:
    sidecar.broker.error = BrokerCallError(404, "not_found", "no approval apr-1")
    status, body, _ = sidecar.call("GET", "/v1/approvals/apr-1")
    assert (status, body) == (404, _err("not_found", "no approval apr-1"))


# -- other methods, other POSTs ---------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD2"])
def test_another_method_is_a_404_that_names_the_endpoints(sidecar: Sidecar,
                                                          method: str) -> None:
    status, body, _ = sidecar.call(method, "/v1/credentials")
    assert (status, body) == (404, _err("not_found", f"no such endpoint {method} "
                                                     f"/v1/credentials; {NOT_FOUND_HINT}"))


@pytest.mark.parametrize("target", ["/v1/credentials/", "/v1/credential", "/v1/freeze/x",
                                    "/healthz"])
def test_a_post_elsewhere_is_a_404(sidecar: Sidecar, target: str) -> None:
    status, body, _ = sidecar.call("POST", target, ASK)
    assert (status, body) == (404, _err("not_found", f"no such endpoint POST {target}; use "
                                                     "POST /v1/credentials"))
    assert sidecar.broker.calls == []


# -- DELETE /v1/credentials/{id} ----------------------------------------------------------


@pytest.mark.parametrize(("already_dead", "revoked"), [(False, True), (True, False)])
def test_hand_back_revokes_at_the_broker_and_forgets_the_credential(
        sidecar: Sidecar, caplog: pytest.LogCaptureFixture, already_dead: bool,
        revoked: bool) -> None:
    sidecar.call("POST", "/v1/credentials", ASK)
    sidecar.broker.already_dead = already_dead
    with caplog.at_level(logging.INFO, logger="credbroker.sidecar"):
        status, body, _ = sidecar.call("DELETE", "/v1/credentials/acc1")
    assert (status, body) == (200, {"credential_id": "acc1", "revoked": revoked,
                                    "already_dead": already_dead})
    assert sidecar.broker.asked("revoke") == [("acc1", "handed back by the agent")]
    assert not sidecar.service.cache.holds("acc1")
    assert f"handed back credential_id=acc1 already_dead={already_dead}" in caplog.messages


def test_a_hand_back_the_broker_refuses_still_forgets_the_credential(sidecar: Sidecar
                                                                     ) -> None:
    sidecar.call("POST", "/v1/credentials", ASK)
    sidecar.broker.error = BrokerCallError(403, "not_yours", "not your credential")
    status, body, _ = sidecar.call("DELETE", "/v1/credentials/acc1")
    assert (status, body) == (403, _err("not_yours", "not your credential"))
    assert len(sidecar.service.cache) == 0


@pytest.mark.parametrize("target", ["/v1/credentials", "/v1/credentials/",
                                    "/v1/credentials/acc1/x", "/v1/credentialsacc1",
                                    "/x/v1/credentials/acc1"])
def test_a_delete_elsewhere_is_a_404_that_says_the_form(sidecar: Sidecar, target: str) -> None:
    status, body, _ = sidecar.call("DELETE", target)
    assert (status, body) == (404, _err("not_found",
                                        "use DELETE /v1/credentials/<credential_id>"))
    assert sidecar.broker.calls == []


def test_a_delete_of_a_malformed_id_is_a_400(sidecar: Sidecar) -> None:
    status, body, _ = sidecar.call("DELETE", "/v1/credentials/acc%0A1")
    assert (status, body) == (400, _err("bad_request",
                                        f"the credential id in the path must be {ID_RULE}"))
    assert sidecar.broker.calls == []


# -- POST /v1/freeze ----------------------------------------------------------------------


def test_freeze_self_drops_the_cache_first_and_answers_the_freeze(
        sidecar: Sidecar, caplog: pytest.LogCaptureFixture) -> None:
    sidecar.call("POST", "/v1/credentials", ASK)
    reason = "prompt injection suspected " + "x" * 300
    with caplog.at_level(logging.WARNING, logger="credbroker.sidecar"):
        status, body, _ = sidecar.call("POST", "/v1/freeze", {"reason": reason})
    assert (status, body) == (200, {
        "frozen": True, "freeze_id": "fz-1", "spiffe_id": SID, "by": SID, "reason": reason,
        "frozen_at": "2026-11-27T12:00:05Z", "credentials_matched": 3,
        "vault_enforced": True})
    assert sidecar.broker.asked("freeze_self") == [reason]
    assert len(sidecar.service.cache) == 0
    assert f"this workload froze itself (freeze fz-1): {reason[:200]}" in caplog.messages


def test_a_freeze_vault_has_not_enforced_yet_says_so(sidecar: Sidecar) -> None:
    sidecar.broker.down = True
    status, body, _ = sidecar.call("POST", "/v1/freeze", {"reason": "r"})
    assert status == 200 and body["vault_enforced"] is False


def test_the_cache_is_dropped_even_when_the_broker_cannot_freeze(sidecar: Sidecar) -> None:
    sidecar.call("POST", "/v1/credentials", ASK)
    sidecar.broker.error = BrokerCallError(503, "broker_unavailable", "retry")
    status, body, _ = sidecar.call("POST", "/v1/freeze", {"reason": "r"})
    assert (status, body) == (503, _err("broker_unavailable", "retry"))
    assert len(sidecar.service.cache) == 0


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"reason": "r", "why": 1}', "unknown field(s) why; allowed: reason"),
    (b"{}", 'reason is required and must be a string, e.g. {"reason": "prompt injection '
            'suspected"}'),
    (b'{"reason": "  "}', 'reason is required and must be a string, e.g. {"reason": "prompt '
                          'injection suspected"}'),
    (b"[1]", 'send a JSON object, e.g. {"action_class": "enrichment"}'),
])
def test_a_bad_freeze_body_is_a_400(sidecar: Sidecar, raw: bytes, message: str) -> None:
    status, body, _ = sidecar.call("POST", "/v1/freeze", raw_body=raw)
    assert (status, body) == (400, _err("bad_request", message))
    assert sidecar.broker.calls == []


# -- what HTTP itself refuses -------------------------------------------------------------


def test_a_malformed_request_gets_the_json_error_and_the_connection_is_closed(
        sidecar: Sidecar) -> None:
    status, headers, data, closed = sidecar.raw(b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
                                               see_close=True)
    body = json.loads(data)
    assert status == 400 and body["error"]["code"] == "bad_request"
    message = body["error"]["message"]
    assert message.startswith("malformed HTTP request (")
    assert message.endswith("); send HTTP/1.1 with a Host header, and a body with a "
                            "Content-Length (chunked bodies are not accepted)")
    assert "\n" not in message and "  " not in message
    assert headers["content-type"] == "application/json" and closed


def test_a_handler_failure_outside_the_guard_is_a_json_500(
        sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        async def health(self) -> tuple[int, dict[str, Any]]:
            return 200, {"status": "ok"}

    http = SidecarHttpServer(sock_dir / "s.sock", cast(SidecarService, Broken()))
    http.serve_in_thread()
    try:
        with caplog.at_level(logging.ERROR, logger="credbroker.sidecar"), \
                socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(http.path))
            s.sendall(b"GET /v1/approvals/apr-1 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _headers, data = read_answer(s)
            assert s.recv(1) == b""
        assert (status, json.loads(data)) == (500, _err(
            "internal", "the sidecar failed unexpectedly; its log has the details"))
        assert "unexpected sidecar error" in caplog.messages
    finally:
        http.close()


def test_beyond_the_bound_the_503_is_the_documented_one(
        sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sc = Sidecar(sock_dir, max_connections=1)
    try:
        with sc.connect() as held:
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(held)[0] == 200
            with caplog.at_level(logging.WARNING, logger="credbroker.sidecar"), \
                    sc.connect() as s:
                status, headers, data = read_answer(s)
                assert s.recv(1) == b""
        assert (status, json.loads(data)) == (503, _err(
            "busy", "the sidecar is serving as many connections as it may; retry in a moment"))
        assert headers == {"content-type": "application/json",
                           "content-length": str(len(data)), "retry-after": "1",
                           "cache-control": "no-store", "connection": "close"}
        assert ("sidecar busy: a connection was answered 503 (all slots taken)"
                in caplog.messages)
    finally:
        sc.close()


# -- the socket ---------------------------------------------------------------------------


def test_the_socket_is_made_in_a_new_directory_replacing_a_stale_one_and_removed_on_close(
        sock_dir: Path) -> None:
    path = sock_dir / "a" / "b" / "s.sock"
    broker = Broker()
    first = SidecarHttpServer(path, _service(broker))
    first._sock.close()  # a sidecar that died: its socket file is left behind
    assert path.exists()
    http = SidecarHttpServer(path, _service(broker))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    http.serve_in_thread()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(s)[0] == 200
    finally:
        http.close()
        first.close()
    assert not path.exists()
    assert http._runner is None


def test_a_server_on_a_shared_loop_leaves_the_loop_running(
        sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = LoopThread("shared")
    try:
        http = SidecarHttpServer(sock_dir / "s.sock", _service(Broker()), loop=loop)
        http.serve_in_thread()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(http.path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(s)[0] == 200  # a keep-alive connection, left open
            with caplog.at_level(logging.DEBUG, logger="credbroker.sidecar"):
                http.close()
            # The server stopped on a loop that goes on: its connections are closed too.
            assert s.recv(1) == b""
        assert not any("stopping the HTTP server" in m for m in caplog.messages)
        assert loop.loop.is_running()
        assert loop.run(asyncio.sleep(0, "alive"), timeout=5) == "alive"
        http.close()  # a second close is harmless
    finally:
        loop.close()


# -- the revocation stream and the hit reporter, started and stopped ---------------------


class WatchingBroker(Broker):
    """A broker whose revocation stream sends ``events`` and then stays open."""

    def __init__(self, events: list[pb.RevocationEvent]) -> None:
        super().__init__()
        self.loop = LoopThread("sidecar-test")
        self.events = events

    async def watch(self, on_event: Any, stop: asyncio.Event) -> None:
        for event in self.events:
            on_event(event)
        await stop.wait()


def test_watching_applies_the_stream_and_stopping_reports_the_last_hits() -> None:
    broker = WatchingBroker([pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        live_credential_ids=[], scope_map_version=V1))])
    sc = _service(broker)
    try:
        req = pb.IssueCredentialRequest(action_class="enrichment")
        sc.start_watching()
        assert sc.synced.wait(5)
        broker.loop.run(sc.issue(req))
        assert sc._watch is not None and sc._watch.get_name() == "watch-revocations"
        assert sc._report is not None and sc._report.get_name() == "report-hits"
        broker.loop.run(sc.issue(req))  # cached: a hit to report
        assert broker.loop.run(sc.issue(req))[1]["cached"] is True
        sc.stop_watching(timeout=5)
        assert [h.credential_id for h in broker.reported] == ["acc1", "acc1"]
        assert sc.reporter.pending == 0
        assert sc._watch.done() and sc._report.done()
    finally:
        broker.loop.close()


def test_stopping_without_starting_only_logs_what_is_unreported(
        caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.down = True
    sc = _service(broker)
    req = pb.IssueCredentialRequest(action_class="enrichment")
    asyncio.run(sc.issue(req))
    asyncio.run(sc.issue(req))
    with caplog.at_level(logging.ERROR, logger="credbroker.sidecar"):
        sc.stop_watching()
    assert ("1 cache hit(s) could not be reported to the broker before the sidecar stopped: "
            "those requests are not in the audit log") in caplog.messages


def test_a_sync_saying_frozen_clears_even_live_credentials_of_the_current_map() -> None:
    broker = Broker()
    sc = _service(broker)
    asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="enrichment")))
    sc.on_revocation_event(pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
        live_credential_ids=["acc1"], scope_map_version=V1, frozen=True)))
    assert len(sc.cache) == 0 and sc.synced.is_set()


def test_an_identity_freeze_naming_a_class_still_empties_the_cache() -> None:
    broker = Broker()
    sc = _service(broker)
    asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="enrichment")))
    asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="containment")))
    sc.on_revocation_event(pb.RevocationEvent(frozen=pb.RevocationEvent.Frozen(
        identity=True, action_class="containment", by="alice", reason="r")))
    assert len(sc.cache) == 0


def test_a_freeze_of_neither_identity_nor_class_drops_nothing() -> None:
    broker = Broker()
    sc = _service(broker)
    asyncio.run(sc.issue(pb.IssueCredentialRequest(action_class="enrichment")))
    sc.on_revocation_event(pb.RevocationEvent(frozen=pb.RevocationEvent.Frozen(
        by="alice", reason="r")))
    assert sc.cache.holds("acc1")


@pytest.mark.parametrize("head", [
    b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/freeze HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_an_empty_post_is_a_400_not_a_dropped_connection(sidecar: Sidecar, head: bytes) -> None:
    """Bug found by this file: aiohttp's empty body stream refuses ``readexactly(0)``, and
    the sidecar took that for half a body and dropped the connection without an answer."""
    status, _, data, _ = sidecar.raw(head)
    assert (status, json.loads(data)) == (400, _err(
        "bad_request", 'send a JSON object, e.g. {"action_class": "enrichment"}'))
    assert sidecar.broker.calls == []


def test_a_service_refusal_as_a_bad_request_is_a_400(sock_dir: Path) -> None:
    """The HTTP layer's mapping: a service method that refuses the input (``BadRequest``)
    is answered 400 with its message, whatever route it came from."""
    class Refusing:
        async def health(self) -> tuple[int, dict[str, Any]]:
            raise BadRequest("say it differently")

    http = SidecarHttpServer(sock_dir / "s.sock", cast(SidecarService, Refusing()))
    http.serve_in_thread()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(http.path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, data = read_answer(s)
        assert (status, json.loads(data)) == (400, _err("bad_request", "say it differently"))
    finally:
        http.close()


def test_without_a_reporter_given_hits_are_reported_through_the_broker_client() -> None:
    broker = Broker()
    sc = SidecarService(cast(BrokerClient, broker), clock=lambda: NOW)
    req = pb.IssueCredentialRequest(action_class="enrichment")
    asyncio.run(sc.issue(req))
    assert asyncio.run(sc.issue(req))[1]["cached"] is True
    assert asyncio.run(sc.reporter.flush_once())
    assert [h.credential_id for h in broker.reported] == ["acc1"]


def test_stopping_goes_on_when_the_loop_is_stuck(caplog: pytest.LogCaptureFixture) -> None:
    """``stop_watching`` bounds its wait (``timeout`` + 5 s) even when the client's loop
    never gets to run the stop: the sidecar still shuts down."""
    broker = WatchingBroker([])
    sc = _service(broker)
    release = threading.Event()
    safety = threading.Timer(20, release.set)  # a stop that waited for the loop: fails
    try:
        sc.start_watching()
        stuck = threading.Event()

        def block() -> None:
            stuck.set()
            release.wait(30)

        broker.loop.loop.call_soon_threadsafe(block)
        assert stuck.wait(5)
        safety.start()
        with caplog.at_level(logging.DEBUG, logger="credbroker.sidecar"):
            sc.stop_watching(timeout=0)
        returned_while_stuck = not release.is_set()
        assert returned_while_stuck
        assert any(m.startswith("stopping the sidecar's background tasks: ")
                   for m in caplog.messages)
    finally:
        release.set()
        safety.cancel()
        broker.loop.close()
