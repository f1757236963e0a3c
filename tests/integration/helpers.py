"""Raw gRPC clients with chosen certificates, for the broker's identity tests."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DEFAULT_BROKER_DNS
from broker.core.spiffeid import SpiffeId
from broker.devspiffe import DevCA, IssuedX509


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
    ``release()``.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = 0
        self._held = threading.Event()
        self._held.set()  # set = flowing
        self._stall_marker: bytes | None = None
        self._unstalled = threading.Event()
        self._unstalled.set()
        self.stalled = 0  # requests held by stall() right now
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self.restore()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
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
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers:
                    self._held.wait()
                else:
                    self._maybe_stall(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def approvals_stub(port: int, trust_ca: DevCA, client: IssuedX509) -> pb_grpc.ApprovalsStub:
    return pb_grpc.ApprovalsStub(channel(port, trust_ca, client))
