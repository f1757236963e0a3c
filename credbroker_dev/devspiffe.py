"""The dev SPIFFE Workload API: a local CA that serves the real Workload API.

This is the embedded stand-in for a SPIRE agent (SPIFFE Workload API spec,
``standards/SPIFFE_Workload_API.md``). It serves ``FetchX509SVID``,
``FetchX509Bundles``, ``FetchJWTSVID``, ``FetchJWTBundles`` and
``ValidateJWTSVID`` over gRPC on unix sockets, so py-spiffe's
``WorkloadApiClient``, ``X509Source`` and ``JwtSource`` work against it
unchanged.

Attestation is by socket: Python gRPC cannot see the caller's pid on a unix
socket, so each workload identity gets a socket of its own (SPIRE attests pods
in production). X.509-SVIDs are short-lived and re-issued at half their life;
open ``FetchX509SVID`` streams receive the new SVID at once.

Every call must carry the metadata ``workload.spiffe.io: true`` (spec section
5.2); without it the call fails with ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import struct_pb2

from broker._proto.spiffe.workload import workload_pb2 as wl
from broker.core.spiffeid import SpiffeId

_log = logging.getLogger(__name__)

#: The upstream (package-less) service name: it is what travels on the wire.
SERVICE_NAME = "SpiffeWorkloadAPI"
HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedX509:
    spiffe_id: SpiffeId
    cert_der: bytes
    key_der: bytes  # PKCS#8, unencrypted — a secret: never log it
    not_after: datetime
    serial: int


class DevCA:
    """A trust domain's dev CA: issues X.509-SVIDs and JWT-SVIDs.

    Pure with respect to time: every issuing method takes ``now``.
    """

    def __init__(self, trust_domain: str, *, now: datetime, ca_ttl: timedelta = timedelta(days=1))\
            -> None:
        SpiffeId.parse(f"spiffe://{trust_domain}")  # validates the trust domain
        self.trust_domain = trust_domain
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "credbroker dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"credbroker dev CA {trust_domain}"),
        ])
        self._ca_name = name
        ski = x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key())
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + ca_ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self._jwt_key = ec.generate_private_key(ec.SECP256R1())
        self.jwt_kid = secrets.token_hex(8)

    @property
    def bundle_der(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.DER)

    @property
    def bundle_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def issue_x509(
        self,
        spiffe_id: SpiffeId,
        *,
        now: datetime,
        ttl: timedelta,
        dns_names: tuple[str, ...] = (),
        not_before: datetime | None = None,
        key_usage: x509.KeyUsage | None = None,
    ) -> IssuedX509:
        """Issue an X.509-SVID (SPIFFE X509-SVID spec: one URI SAN, leaf, digitalSignature).

        ``key_usage`` replaces the spec's digitalSignature-only usage: tests use it to
        issue a leaf the broker must refuse.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans += [x509.DNSName(d) for d in dns_names]
        not_after = now + ttl
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else "svid"),
            ]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before or now - timedelta(seconds=30))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                key_usage or x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        return IssuedX509(
            spiffe_id=spiffe_id,
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            key_der=key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            not_after=not_after,
            serial=serial,
        )

    def issue_jwt(
        self, spiffe_id: SpiffeId, audience: list[str], *, now: datetime, ttl: timedelta
    ) -> str:
        """Issue a JWT-SVID (SPIFFE JWT-SVID spec: ES256, kid, sub, aud, exp)."""
        claims = {
            "sub": str(spiffe_id),
            "aud": audience,
            "iat": int(now.timestamp()),
            "exp": int((now + ttl).timestamp()),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._jwt_key, algorithm="ES256",
                          headers={"kid": self.jwt_kid, "typ": "JWT"})

    def jwks(self) -> bytes:
        """The JWT bundle (RFC 7517 JWK Set) for this trust domain."""
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._jwt_key.public_key()))
        jwk.update({"kid": self.jwt_kid, "use": "jwt-svid", "alg": "ES256"})
        return json.dumps({"keys": [jwk]}).encode()

    def validate_jwt(self, token: str, audience: str, *, now: datetime) -> dict[str, Any]:
        """Validate a JWT-SVID issued by this CA.

        Raises:
            jwt.PyJWTError: the token is invalid, expired or for another audience.
        """
        claims: dict[str, Any] = jwt.decode(
            token, self._jwt_key.public_key(), algorithms=["ES256"], audience=audience,
            options={"require": ["sub", "aud", "exp"]}, leeway=0,
        )
        if claims["exp"] < now.timestamp():
            raise jwt.ExpiredSignatureError("JWT-SVID has expired")
        SpiffeId.parse(claims["sub"])
        return claims


@dataclass(slots=True)
class _Workload:
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...]
    socket_path: str
    svid: IssuedX509 | None = None
    issued_at: datetime | None = None
    version: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)


class DevWorkloadApi:
    """Serves the SPIFFE Workload API for a set of workload identities, one socket each."""

    def __init__(
        self,
        ca: DevCA,
        *,
        svid_ttl: timedelta = timedelta(hours=1),
        jwt_ttl: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.ca = ca
        self.svid_ttl = svid_ttl
        self.jwt_ttl = jwt_ttl
        self._clock = clock
        self._workloads: list[_Workload] = []
        self._servers: list[grpc.Server] = []
        self._stop = threading.Event()
        self._rotator: threading.Thread | None = None

    def add_workload(
        self, spiffe_id: SpiffeId | str, socket_path: str, *, dns_names: tuple[str, ...] = ()
    ) -> None:
        """Serve ``spiffe_id``'s SVIDs on ``socket_path`` (created with mode 0600 dir-scoped).

        Raises:
            InvalidSpiffeIdError: ``spiffe_id`` is not a valid SPIFFE ID.
            ValueError: ``spiffe_id`` is not in the CA's trust domain.
        """
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        if sid.trust_domain != self.ca.trust_domain:
            raise ValueError(f"{sid} is not in trust domain {self.ca.trust_domain}")
        wl_ = _Workload(spiffe_id=sid, dns_names=dns_names, socket_path=socket_path)
        self._issue(wl_)
        self._workloads.append(wl_)
        if self._rotator is not None:
            self._serve(wl_)

    def start(self) -> None:
        """Start one gRPC server per workload socket and the rotation thread."""
        for w in self._workloads:
            self._serve(w)
        self._rotator = threading.Thread(target=self._rotate_loop, name="svid-rotator",
                                         daemon=True)
        self._rotator.start()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workloads:
            with w.changed:
                w.changed.notify_all()
        for s in self._servers:
            s.stop(grace=0.5).wait()
        for w in self._workloads:
            try:
                os.unlink(w.socket_path)
            except FileNotFoundError:
                pass

    def rotate_now(self, spiffe_id: SpiffeId | None = None) -> None:
        """Re-issue SVIDs immediately (all, or one identity's); streams get them at once."""
        for w in self._workloads:
            if spiffe_id is None or w.spiffe_id == spiffe_id:
                self._issue(w)

    # -- internals

    def _issue(self, w: _Workload) -> None:
        now = self._clock()
        svid = self.ca.issue_x509(w.spiffe_id, now=now, ttl=self.svid_ttl, dns_names=w.dns_names)
        with w.changed:
            w.svid, w.issued_at = svid, now
            w.version += 1
            w.changed.notify_all()
        _log.debug("issued X.509-SVID for %s serial=%x until %s", w.spiffe_id, svid.serial,
                    svid.not_after.isoformat())

    def _rotate_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.svid_ttl.total_seconds() / 10)):
            now = self._clock()
            for w in self._workloads:
                assert w.issued_at is not None
                if now >= w.issued_at + self.svid_ttl / 2:
                    self._issue(w)

    def _serve(self, w: _Workload) -> None:
        os.makedirs(os.path.dirname(w.socket_path) or ".", exist_ok=True)
        try:
            os.unlink(w.socket_path)
        except FileNotFoundError:
            pass
        # Each open stream pins a worker thread of a sync server: X509Source and
        # JwtSource hold one stream each, so leave room for several clients.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32,
                                                        thread_name_prefix="wlapi"))
        server.add_generic_rpc_handlers((_handlers(self, w),))
        server.add_insecure_port(f"unix:{w.socket_path}")
        server.start()
        os.chmod(w.socket_path, 0o600)
        self._servers.append(server)

    def _x509_response(self, w: _Workload) -> wl.X509SVIDResponse:
        assert w.svid is not None
        return wl.X509SVIDResponse(svids=[wl.X509SVID(
            spiffe_id=str(w.spiffe_id), x509_svid=w.svid.cert_der, x509_svid_key=w.svid.key_der,
            bundle=self.ca.bundle_der,
        )])

    def _watch(self, w: _Workload, context: grpc.ServicerContext,
               make: Callable[[], Any], *, follows_svid: bool) -> Iterator[Any]:
        """Yield ``make()`` now and again whenever the SVID changes (if ``follows_svid``)."""
        sent: int | None = None
        while not self._stop.is_set() and context.is_active():
            with w.changed:
                current = w.version if follows_svid else 0
                if current == sent:
                    w.changed.wait(timeout=1.0)
                    continue
            sent = current
            yield make()


def _require_header(context: grpc.ServicerContext) -> None:
    md = dict(context.invocation_metadata())
    if md.get(HEADER_KEY) != HEADER_VALUE:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      "security header missing from request (workload.spiffe.io: true)")


def _handlers(api: DevWorkloadApi, w: _Workload) -> grpc.GenericRpcHandler:
    td = api.ca.trust_domain

    def fetch_x509_svid(_req: wl.X509SVIDRequest, ctx: grpc.ServicerContext) \
            -> Iterator[wl.X509SVIDResponse]:
        _require_header(ctx)
        yield from api._watch(w, ctx, lambda: api._x509_response(w), follows_svid=True)

    def fetch_x509_bundles(_req: wl.X509BundlesRequest, ctx: grpc.ServicerContext) \
            -> Iterator[wl.X509BundlesResponse]:
        _require_header(ctx)
        yield from api._watch(
            w, ctx, lambda: wl.X509BundlesResponse(bundles={td: api.ca.bundle_der}),
            follows_svid=False)

    def fetch_jwt_bundles(_req: wl.JWTBundlesRequest, ctx: grpc.ServicerContext) \
            -> Iterator[wl.JWTBundlesResponse]:
        _require_header(ctx)
        yield from api._watch(w, ctx, lambda: wl.JWTBundlesResponse(bundles={td: api.ca.jwks()}),
                              follows_svid=False)

    def fetch_jwt_svid(req: wl.JWTSVIDRequest, ctx: grpc.ServicerContext) -> wl.JWTSVIDResponse:
        _require_header(ctx)
        if not req.audience:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if req.spiffe_id and req.spiffe_id != str(w.spiffe_id):
            ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"no identity issued for {req.spiffe_id} on this socket")
        token = api.ca.issue_jwt(w.spiffe_id, list(req.audience), now=api._clock(),
                                 ttl=api.jwt_ttl)
        return wl.JWTSVIDResponse(svids=[wl.JWTSVID(spiffe_id=str(w.spiffe_id), svid=token)])

    def validate_jwt_svid(req: wl.ValidateJWTSVIDRequest, ctx: grpc.ServicerContext) \
            -> wl.ValidateJWTSVIDResponse:
        _require_header(ctx)
        if not req.audience or not req.svid:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience and svid must be specified")
        try:
            claims = api.ca.validate_jwt(req.svid, req.audience, now=api._clock())
        except (jwt.PyJWTError, ValueError) as exc:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"JWT-SVID is not valid: {exc}")
        st = struct_pb2.Struct()
        st.update(claims)
        return wl.ValidateJWTSVIDResponse(spiffe_id=claims["sub"], claims=st)

    def stream(fn: Any, req_t: Any, resp_t: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_stream_rpc_method_handler(
            fn, request_deserializer=req_t.FromString, response_serializer=resp_t.SerializeToString)

    def unary(fn: Any, req_t: Any, resp_t: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req_t.FromString, response_serializer=resp_t.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "FetchX509SVID": stream(fetch_x509_svid, wl.X509SVIDRequest, wl.X509SVIDResponse),
        "FetchX509Bundles": stream(fetch_x509_bundles, wl.X509BundlesRequest,
                                   wl.X509BundlesResponse),
        "FetchJWTBundles": stream(fetch_jwt_bundles, wl.JWTBundlesRequest, wl.JWTBundlesResponse),
        "FetchJWTSVID": unary(fetch_jwt_svid, wl.JWTSVIDRequest, wl.JWTSVIDResponse),
        "ValidateJWTSVID": unary(validate_jwt_svid, wl.ValidateJWTSVIDRequest,
                                 wl.ValidateJWTSVIDResponse),
    })

