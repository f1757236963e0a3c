"""Raw gRPC clients with chosen certificates, for the broker's identity tests."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.core.spiffeid import SpiffeId
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devspiffe import DevCA, IssuedX509


def pem_pair(svid: IssuedX509) -> tuple[bytes, bytes]:
    key = serialization.load_der_private_key(svid.key_der, None)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = x509.load_der_x509_certificate(svid.cert_der).public_bytes(
        serialization.Encoding.PEM)
    return key_pem, cert_pem


def svid(ca: DevCA, spiffe_id: str, *, ttl: timedelta = timedelta(minutes=10),
         now: datetime | None = None) -> IssuedX509:
    return ca.issue_x509(SpiffeId.parse(spiffe_id), now=now or datetime.now(UTC), ttl=ttl)


def channel(port: int, trust_ca: DevCA, client: IssuedX509 | None) -> grpc.Channel:
    """An mTLS channel to a broker on loopback, with ``client``'s SVID (or none)."""
    if client is None:
        creds = grpc.ssl_channel_credentials(root_certificates=trust_ca.bundle_pem)
    else:
        key, cert = pem_pair(client)
        creds = grpc.ssl_channel_credentials(root_certificates=trust_ca.bundle_pem,
                                             private_key=key, certificate_chain=cert)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", DEFAULT_BROKER_DNS)])


def stub(port: int, trust_ca: DevCA, client: IssuedX509 | None) -> pb_grpc.CredentialBrokerStub:
    return pb_grpc.CredentialBrokerStub(channel(port, trust_ca, client))


def issue_request(action_class: str = "enrichment", **kw: object) -> pb.IssueCredentialRequest:
    return pb.IssueCredentialRequest(action_class=action_class, **kw)  # type: ignore[arg-type]


EVENT = pb.InitiatingEvent(source="splunk", id="NOTABLE-1", summary="beaconing")


def admin_stub(port: int, trust_ca: DevCA, client: IssuedX509) -> pb_grpc.CredentialAdminStub:
    return pb_grpc.CredentialAdminStub(channel(port, trust_ca, client))


class TcpProxy:
    """A real TCP forwarder on loopback between the broker and OpenBao, for network faults.

    ``cut()`` refuses new connections and drops open ones (a partition);
    ``restore()`` listens again on the same port; ``hold()`` keeps Vault's answers
    from reaching the broker (Vault has acted, the broker has not heard) until
    ``release()``. ``stall(marker)`` holds back only the requests carrying ``marker``
    (Vault has not acted) until ``unstall()``.

    For HTTP (the broker's side of Vault): ``fail_answers(marker)`` forwards each
    request carrying ``marker`` (every request with ``b""``) to Vault, waits for Vault's
    answer, and sends the client ``HTTP/1.1 502 Bad Gateway`` instead, then closes (the
    request reached Vault; the client cannot know what Vault did); ``blackhole()`` drops
    open connections and then accepts and reads but never forwards nor answers;
    ``slow(delay)`` waits ``delay`` seconds before relaying each chunk, both ways.
    """

    BAD_GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n"
                   b"Content-Length: 11\r\nConnection: close\r\n\r\nbad gateway")

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = 0
        self._held = threading.Event()
        self._held.set()  # set = flowing
        self._stall_marker: bytes | None = None
        self._unstalled = threading.Event()
        self._unstalled.set()
        self.stalled = 0  # requests held by stall() right now
        self._fail_marker: bytes | None = None
        self.failed = 0  # answers replaced by a 502 so far
        self._blackholed = False
        self.swallowed = 0  # connections the black hole took in
        self.delay = 0.0
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self.restore()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        """Listen again (on the same port); a no-op while listening."""
        if self._listener is not None:
            return
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self.port = lst.getsockname()[1]
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                try:  # wakes the accept() blocked in another thread and stops listening
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
        self.drop()

    def drop(self) -> None:
        """Close every open connection (the listener stays)."""
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def hold(self) -> None:
        self._held.clear()

    def release(self) -> None:
        self._held.set()

    def stall(self, marker: bytes) -> None:
        with self._lock:
            self._stall_marker = marker
            self._unstalled.clear()

    def unstall(self) -> None:
        with self._lock:
            self._stall_marker = None
            self._unstalled.set()

    def fail_answers(self, marker: bytes = b"") -> None:
        """Answer each request carrying ``marker`` with a 502 once Vault has answered it."""
        with self._lock:
            self._fail_marker = marker

    def stop_failing(self) -> None:
        with self._lock:
            self._fail_marker = None

    def blackhole(self) -> None:
        with self._lock:
            self._blackholed = True
        self.drop()

    def unblackhole(self) -> None:
        with self._lock:
            self._blackholed = False
        self.drop()

    def slow(self, delay: float) -> None:
        """Wait ``delay`` seconds before relaying each chunk (0: full speed again)."""
        self.delay = delay

    def _maybe_stall(self, data: bytes) -> None:
        with self._lock:
            marker = self._stall_marker
            if marker is None or marker not in data:
                return
            self.stalled += 1
        self._unstalled.wait()
        with self._lock:
            self.stalled -= 1

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            with self._lock:
                blackholed = self._blackholed
                if blackholed:
                    self.swallowed += 1
                    self._conns.append(client)
            if blackholed:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            state = {"fail": False}
            threading.Thread(target=self._pipe, args=(client, server, False, state),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True, state),
                             daemon=True).start()

    @staticmethod
    def _swallow(client: socket.socket) -> None:
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass
        finally:
            client.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool,
              state: dict[str, bool]) -> None:
        try:
            while data := src.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                if answers:
                    self._held.wait()
                    if state["fail"]:  # Vault answered; the client hears a 502 instead
                        with self._lock:
                            self.failed += 1
                        dst.sendall(self.BAD_GATEWAY)
                        return
                else:
                    self._maybe_stall(data)
                    with self._lock:
                        marker = self._fail_marker
                    if marker is not None and marker in data:
                        state["fail"] = True
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:  # shutdown wakes the other direction's recv()
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def approvals_stub(port: int, trust_ca: DevCA, client: IssuedX509) -> pb_grpc.ApprovalsStub:
    return pb_grpc.ApprovalsStub(channel(port, trust_ca, client))
