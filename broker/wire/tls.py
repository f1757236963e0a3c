"""gRPC TLS material from py-spiffe's X509Source, following SVID rotation.

gRPC Python cannot use pyOpenSSL contexts, so we build credentials from PEM
bytes. The server uses ``grpc.dynamic_ssl_server_credentials``, whose fetcher
gRPC calls on every new handshake, so a rotated SVID or bundle is used without
a restart. Clients verify the broker by the DNS SAN of its SVID (gRPC Python
cannot verify a server certificate that has only a URI SAN) through
``grpc.ssl_target_name_override``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, X509Source


@dataclass(frozen=True, slots=True)
class PemMaterial:
    key: bytes = field(repr=False)  # secret
    chain: bytes = b""
    bundle: bytes = b""
    serial: int = 0
    spiffe_id: str = ""
    trust_domain: str = ""


def pem_material(source: X509Source) -> PemMaterial:
    """The current SVID and trust bundle of ``source`` as PEM."""
    ctx = source.get_x509_context()
    svid = ctx.default_svid
    td = svid.spiffe_id.trust_domain
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
    if bundle is None:
        raise RuntimeError(f"the Workload API gave no X.509 bundle for {td}")
    return PemMaterial(
        key=svid.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        chain=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain),
        bundle=b"".join(a.public_bytes(serialization.Encoding.PEM)
                        for a in bundle.x509_authorities),
        serial=svid.leaf.serial_number,
        spiffe_id=str(svid.spiffe_id),
        trust_domain=str(td.name),
    )


def local_authorities(source: X509Source, trust_domain: str) -> tuple[x509.Certificate, ...]:
    """Our own trust domain's X.509 authorities, from the Workload API's current bundle."""
    bundle = source.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    return tuple(bundle.x509_authorities) if bundle is not None else ()


def _generation(source: X509Source) -> tuple[object, ...]:
    """The live SVID and bundle objects: the same objects until the next Workload API update.

    (``get_x509_context()`` builds a new wrapper on every call, so compare what it wraps.)
    """
    ctx = source.get_x509_context()
    return (ctx.default_svid, *ctx.x509_bundle_set.bundles)


def _same(a: tuple[object, ...] | None, b: tuple[object, ...]) -> bool:
    return a is not None and len(a) == len(b) and all(
        x is y or (type(x) is int and x == y) for x, y in zip(a, b, strict=True))


def server_credentials(source: X509Source,
                       federated: Callable[[], tuple[int, bytes]] | None = None,
                       ) -> grpc.ServerCredentials:
    """mTLS server credentials that require a client certificate chained to the bundle.

    ``federated`` gives the federated trust domains' CAs (a generation number and PEM):
    they join the root set, so their workloads complete the handshake. Which trust
    domain's CA may vouch for which SPIFFE ID is checked after it (``check_chain``).
    """
    lock = threading.Lock()

    def extra() -> tuple[int, bytes]:
        return federated() if federated is not None else (0, b"")

    seen = [(*_generation(source), extra()[0])]
    current = pem_material(source)
    roots = current.bundle + extra()[1]

    def config(m: PemMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key, m.chain)],
                                                         root_certificates=roots)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal current, roots
        generation_number, extra_pem = extra()
        generation = (*_generation(source), generation_number)
        with lock:
            if _same(seen[0], generation):
                return None  # unchanged: gRPC keeps the one it has
            seen[0] = generation
            current = pem_material(source)
            roots = current.bundle + extra_pem
            return config(current)

    return grpc.dynamic_ssl_server_credentials(config(current), fetch,
                                               require_client_authentication=True)


#: Ping an idle connection so a half-open one (broker gone, no FIN) is noticed and the
#: revocation stream reconnects and resynchronises.
KEEPALIVE = (("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
             ("grpc.keepalive_permit_without_calls", 1))
#: What the broker lets clients do (and pings them itself).
SERVER_KEEPALIVE = (("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 10_000),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
                    ("grpc.http2.max_ping_strikes", 0))


def channel_credentials(m: PemMaterial) -> grpc.ChannelCredentials:
    """mTLS client credentials: our SVID, and the broker verified against our bundle."""
    return grpc.ssl_channel_credentials(root_certificates=m.bundle, private_key=m.key,
                                        certificate_chain=m.chain)


def channel_options(server_dns_name: str) -> list[tuple[str, str | int]]:
    """Verify the broker by its SVID's DNS SAN; keep idle connections alive."""
    return [("grpc.ssl_target_name_override", server_dns_name), *KEEPALIVE]


#: How long a channel replaced on rotation stays open for the calls still on it.
OLD_CHANNEL_GRACE_SECONDS = 30.0


class RotatingChannel:
    """A client channel to the broker that is rebuilt when our SVID rotates."""

    def __init__(self, source: X509Source, target: str, server_dns_name: str) -> None:
        self._source = source
        self._target = target
        self._dns = server_dns_name
        self._lock = threading.Lock()
        self._generation: tuple[object, ...] | None = None
        self._channel: grpc.Channel | None = None

    def get(self) -> grpc.Channel:
        generation = _generation(self._source)
        with self._lock:
            if self._channel is None or not _same(self._generation, generation):
                old = self._channel
                self._channel = grpc.secure_channel(
                    self._target, channel_credentials(pem_material(self._source)),
                    options=channel_options(self._dns))
                self._generation = generation
                if old is not None:
                    # in-flight calls on the old channel finish; it is closed when idle
                    closer = threading.Timer(OLD_CHANNEL_GRACE_SECONDS, old.close)
                    closer.daemon = True
                    closer.start()
            return self._channel

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class AioRotatingChannel:
    """:class:`RotatingChannel` on ``grpc.aio``: one channel, rebuilt when our SVID rotates.

    Used from one event loop only (a ``grpc.aio`` channel belongs to the loop it was made
    on): :meth:`get` makes the channel on the running loop, the first time and after each
    rotation. ``credentials`` builds the TLS credentials from our current SVID.
    """

    def __init__(self, source: X509Source, target: str, server_dns_name: str, *,
                 credentials: Callable[[PemMaterial], grpc.ChannelCredentials]
                 = channel_credentials,
                 trust_generation: Callable[[], object] | None = None) -> None:
        self._source = source
        self._target = target
        self._dns = server_dns_name
        self._credentials = credentials
        #: Changes when what ``credentials`` trusts changes (the broker's trust domain's
        #: bundle, for a sidecar of another trust domain): the channel is rebuilt then too.
        self._trust_generation = trust_generation
        self._generation: tuple[object, ...] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._retired: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def get(self) -> grpc.aio.Channel:
        """The channel for the current SVID (call on the loop that uses it).

        Raises: what ``credentials`` raises (e.g. BrokerUnavailableError: no trust yet).
        """
        generation = (*_generation(self._source),
                      self._trust_generation() if self._trust_generation is not None else 0)
        if self._channel is None or not _same(self._generation, generation):
            old = self._channel
            self._channel = grpc.aio.secure_channel(
                self._target, self._credentials(pem_material(self._source)),
                options=channel_options(self._dns))
            self._generation = generation
            if old is not None:  # in-flight calls on the old channel finish first
                task = asyncio.get_running_loop().create_task(
                    old.close(grace=OLD_CHANNEL_GRACE_SECONDS))
                self._retired[task] = old
                task.add_done_callback(lambda t: self._retired.pop(t, None))
        return self._channel

    async def close(self) -> None:
        """Close the channel and any retired one at once (calls still on them are
        cancelled)."""
        channels = list(self._retired.values())
        for task in list(self._retired):
            task.cancel()
        if self._channel is not None:
            channels.append(self._channel)
            self._channel = None
        for channel in channels:
            await channel.close()


def diagnose_handshake(target: str, server_dns_name: str, material: PemMaterial | None,
                       *, timeout: float = 3.0, roots: bytes | None = None) -> str | None:
    """Why the broker refuses our TLS handshake, or None if it does not (or is unreachable).

    gRPC Python can only make a server require *and* verify client certificates
    in the handshake, and a refused handshake reaches the client as a bare
    UNAVAILABLE "Socket closed", which looks like an outage. After such a
    failure, clients call this to repeat the handshake with Python's ``ssl``
    module and tell the two apart: a broker that completes TLS 1.3 and then
    closes without sending a byte (gRPC servers send SETTINGS at once) has
    refused our certificate. The private key reaches OpenSSL through an
    anonymous in-memory file, never the disk.
    """
    import os
    import socket
    import ssl

    host, _, port = target.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2"])
    fd = -1
    try:
        if material is not None:
            ctx.load_verify_locations(cadata=(roots or material.bundle).decode())
            fd = os.memfd_create("svid", os.MFD_CLOEXEC)
            os.write(fd, material.chain + material.key)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        try:
            raw = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError:
            return None  # unreachable: not an identity problem
        with raw, ctx.wrap_socket(raw, server_hostname=server_dns_name) as tls:
            # HTTP/2 preface and an empty SETTINGS frame, as a gRPC client sends.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            tls.settimeout(timeout)
            if tls.recv(1):
                return None  # the broker talks to us: the handshake was accepted
        return ("the broker closed the connection right after the TLS handshake: it refused "
                "this workload's X.509-SVID (not issued by a CA the broker trusts, expired, "
                "or missing)")
    except ssl.SSLCertVerificationError as exc:
        return f"this workload could not verify the broker's certificate: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"the broker refused the TLS handshake: {exc.reason or exc}"
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)
