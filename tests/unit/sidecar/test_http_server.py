"""The sidecar's HTTP server on a real unix socket, with a stand-in for the broker side:
hostile bodies are 400s, silent connections are dropped, parallel calls are all answered."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from sidecar.app import LISTEN_BACKLOG, SidecarHttpServer, SidecarService


class FakeService:
    """Answers like SidecarService without a broker; ``delay`` makes calls overlap."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.issued: list[pb.IssueCredentialRequest] = []
        self.lock = threading.Lock()
        self.running = self.most = 0

    async def health(self) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        await asyncio.sleep(self.delay)
        with self.lock:
            self.running -= 1
        return 200, {"status": "ok"}

    async def issue(self, msg: pb.IssueCredentialRequest, wait: int = 0
                    ) -> tuple[int, dict[str, Any]]:
        self.issued.append(msg)
        return 200, {"credential_id": "c1", "cached": False}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cbs-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _serve(sock_dir: Path, service: FakeService, **kw: Any) -> SidecarHttpServer:
    http = SidecarHttpServer(sock_dir / "s.sock", cast(SidecarService, service), **kw)
    http.serve_in_thread()
    return http


def _connect(http: SidecarHttpServer, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(http.path))
    return s


def _read_response(s: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), json.loads(body)


def _post(body: bytes) -> bytes:
    return (b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def _closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``s`` (fails if it has not within ``seconds``)."""
    s.settimeout(seconds)
    start = time.monotonic()
    assert s.recv(1024) == b""
    return time.monotonic() - start


@pytest.mark.parametrize(("body", "words"), [
    (b"[" * 30_000 + b"]" * 30_000, "more than 8 deep"),
    (b'{"action_class": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"action_class": "\xff\xfe"}', "not UTF-8"),
    (b'["enrichment"]', "JSON object"),
    (b'{"action_class": 7}', "action_class is required"),
])
def test_hostile_bodies_are_400_not_500(sock_dir: Path, body: bytes, words: str) -> None:
    service = FakeService()
    http = _serve(sock_dir, service)
    try:
        with _connect(http) as s:
            s.sendall(_post(body))
            status, payload = _read_response(s)
        assert status == 400, payload
        assert payload["error"]["code"] == "bad_request"
        assert words in payload["error"]["message"]
        assert service.issued == []
    finally:
        http.close()


def test_oversized_and_chunked_bodies_are_refused_and_the_connection_closed(
    sock_dir: Path
) -> None:
    http = _serve(sock_dir, FakeService())
    try:
        with _connect(http) as s:
            s.sendall(b"POST /v1/credentials HTTP/1.1\r\nContent-Length: 65537\r\n\r\n")
            status, payload = _read_response(s)
            assert status == 413 and payload["error"]["code"] == "too_large"
            assert s.recv(1024) == b""
        with _connect(http) as s:
            s.sendall(b"POST /v1/credentials HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\n{}{}{\r\n0\r\n\r\n")
            status, payload = _read_response(s)
            assert status == 400 and "Content-Length" in payload["error"]["message"]
    finally:
        http.close()


@pytest.mark.parametrize("sent", [
    b"",  # connects and says nothing
    b"POST /v1/credentials HTTP/1.1\r\nContent-Le",  # half the headers
    _post(b'{"action_class": "enrichment"}')[:-10],  # headers, half the body
])
def test_a_silent_connection_is_dropped_after_the_idle_timeout(sock_dir: Path,
                                                               sent: bytes) -> None:
    http = _serve(sock_dir, FakeService(), idle_timeout=0.5)
    try:
        with _connect(http) as s:
            s.sendall(sent)
            assert 0.3 < _closed_within(s, 5.0) < 3.0
        with _connect(http) as s:  # and the server still answers others
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(s)[0] == 200
    finally:
        http.close()


def test_an_idle_keep_alive_connection_is_dropped_too(sock_dir: Path) -> None:
    http = _serve(sock_dir, FakeService(), idle_timeout=0.5)
    try:
        with _connect(http) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(s)[0] == 200
            assert _closed_within(s, 5.0) < 3.0
    finally:
        http.close()


def test_64_parallel_connections_are_all_answered(sock_dir: Path) -> None:
    assert LISTEN_BACKLOG >= 128
    service = FakeService(delay=0.2)
    http = _serve(sock_dir, service)
    try:
        conns = [_connect(http) for _ in range(64)]  # all open before any request is sent
        for s in conns:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        statuses = [_read_response(s)[0] for s in conns]
        for s in conns:
            s.close()
        assert statuses == [200] * 64
        assert service.most > 1  # they were served side by side, not one after another
    finally:
        http.close()


def test_beyond_the_connection_bound_the_answer_is_a_quick_503(sock_dir: Path) -> None:
    http = _serve(sock_dir, FakeService(), max_connections=2)
    try:
        held = [_connect(http) for _ in range(2)]
        for s in held:  # answered, and kept alive: each holds its slot
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(s)[0] == 200
        with _connect(http) as s:
            start = time.monotonic()
            status, payload = _read_response(s)
            assert status == 503 and payload["error"]["code"] == "busy"
            assert time.monotonic() - start < 2.0
        for s in held:
            s.close()
        status, deadline = 0, time.monotonic() + 5.0
        while status != 200 and time.monotonic() < deadline:  # slots come back on close
            with _connect(http) as s:
                try:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    status = _read_response(s)[0]
                except OSError:  # answered 503 and closed before the request was sent
                    time.sleep(0.05)
        assert status == 200
    finally:
        http.close()


def test_a_chunked_body_with_a_host_header_is_refused_by_the_sidecar_itself(
        sock_dir: Path) -> None:
    service = FakeService()
    http = _serve(sock_dir, service)
    try:
        with _connect(http) as s:
            s.sendall(b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n5\r\n{}{}{\r\n0\r\n\r\n")
            status, payload = _read_response(s)
            assert status == 400 and payload["error"]["code"] == "bad_request"
            assert "chunked bodies are not accepted" in payload["error"]["message"]
            assert s.recv(1024) == b""
        assert service.issued == []
    finally:
        http.close()
