"""Who is calling: the SPIFFE ID in the mTLS peer certificate, optionally a JWT-SVID too.

The TLS layer already required a client certificate chained to the trust
bundle (``require_client_authentication``), so a certificate from another CA,
an expired one, or none at all never reaches this code: the handshake is
refused. What reaches it is checked again here, per the X509-SVID spec
(``standards/X509-SVID.md``): a leaf (basicConstraints cA false, §4.1), a key
usage with digitalSignature and without keyCertSign or cRLSign (§4.3, §5.2), an
extended key usage, when present, that allows clientAuth (§4.4), exactly one URI
SAN, a valid SPIFFE ID, in our trust domain (or a federated one), within its validity at
``now``.

With federation the TLS root set holds several trust domains' CAs, so the handshake alone
would let a vendor's CA vouch for a SPIFFE ID of ours (or of a third domain).
:func:`check_chain` closes that: the peer's chain must lead to an authority of the trust
domain its SPIFFE ID names, and only that domain's.

A JWT-SVID (``standards/JWT-SVID.md``) in ``authorization: Bearer`` metadata is
validated with py-spiffe against the JWT bundle for the exact audience, and its
subject must equal the mTLS peer.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Sequence
from datetime import datetime

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from spiffe import JwtBundle, TrustDomain
from spiffe.svid.jwt_svid import JwtSvid

from broker.core.spiffeid import SpiffeId
from broker.errors import IdentityError, InvalidSpiffeIdError


def spiffe_id_from_certificate(
    pem: bytes, *, trust_domain: str, now: datetime,
    federated: frozenset[str] = frozenset(),
) -> tuple[SpiffeId, str]:
    """The SPIFFE ID of a peer's X.509-SVID (PEM) and the certificate's serial (hex).

    Raises:
        IdentityError: the certificate is not an acceptable X.509-SVID of ``trust_domain``
            (or of one of the ``federated`` trust domains).
    """
    sid, serial, not_before, not_after = _parse_svid(pem, trust_domain, federated)
    if not (not_before <= now <= not_after):
        raise IdentityError(f"the X.509-SVID of {sid} is not valid at {now.isoformat()}")
    return sid, serial


@functools.lru_cache(maxsize=4096)
def _parse_svid(pem: bytes, trust_domain: str, federated: frozenset[str] = frozenset()) \
        -> tuple[SpiffeId, str, datetime, datetime]:
    """The time-independent checks, cached: a peer presents the same SVID on every call
    until it rotates, so issuance does not re-parse it. (Refusals are not cached.)

    Raises:
        IdentityError: as :func:`spiffe_id_from_certificate`.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise IdentityError("the client certificate could not be parsed") from None
    try:
        cert.extensions  # noqa: B018 - parsed once here, so a malformed one is refused cleanly
    except (ValueError, x509.DuplicateExtension):
        raise IdentityError("the client certificate's extensions could not be parsed") from None
    _check_leaf_usage(cert)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise IdentityError(
            f"the client certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one "
            "(its SPIFFE ID)"
        )
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as exc:
        raise IdentityError(f"the client certificate's URI SAN is not a SPIFFE ID: {exc}") from None
    if sid.trust_domain != trust_domain and sid.trust_domain not in federated:
        also = f" and the federated {', '.join(sorted(federated))}" if federated else ""
        raise IdentityError(
            f"{sid} belongs to trust domain {sid.trust_domain!r}; this broker serves only "
            f"{trust_domain!r}{also}"
        )
    return (sid, format(cert.serial_number, "x"), cert.not_valid_before_utc,
            cert.not_valid_after_utc)


def check_chain(chain_pem: bytes, authorities: Sequence[x509.Certificate], *,
                trust_domain: str, now: datetime) -> None:
    """The peer's chain (leaf first, PEM) leads to one of ``authorities`` (the bundle of
    ``trust_domain``, the domain the leaf's SPIFFE ID names), through CA certificates the
    peer presented, each within its validity at ``now``.

    Raises:
        IdentityError: no such path: the certificate was issued by another trust domain's
            CA (or that domain has no bundle yet).
    """
    if not authorities:
        raise IdentityError(f"no X.509 bundle for trust domain {trust_domain!r} (yet): its "
                            "workloads cannot be verified")
    if not _chains_to(chain_pem, tuple(authorities), now.replace(second=0, microsecond=0)):
        raise IdentityError(f"the client certificate does not chain to the bundle of its own "
                            f"trust domain {trust_domain!r}: another trust domain's CA may "
                            "not vouch for it")


@functools.lru_cache(maxsize=4096)
def _chains_to(chain_pem: bytes, authorities: tuple[x509.Certificate, ...],
               minute: datetime) -> bool:
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        return False
    current, rest = chain[0], list(chain[1:])
    for _ in range(8):
        for ca in authorities:
            if _issued(ca, current) and ca.not_valid_before_utc <= minute \
                    and minute <= ca.not_valid_after_utc:
                return True
        parent = next((c for c in rest if _is_ca(c) and _issued(c, current)
                       and c.not_valid_before_utc <= minute <= c.not_valid_after_utc), None)
        if parent is None:
            return False
        rest.remove(parent)
        current = parent
    return False


def _issued(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _check_leaf_usage(cert: x509.Certificate) -> None:
    """The X509-SVID spec's rules for a leaf used to authenticate a client.

    An absent basicConstraints means cA false (RFC 5280 §4.2.1.9), so only cA true is
    refused. keyUsage criticality (an issuing rule) is not checked: the usage is checked
    here whatever its flag. Of the extended key usages §4.4 asks for, the one a client
    needs, clientAuth, is required when the extension is present.

    Raises:
        IdentityError: naming the rule the certificate breaks.
    """
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise IdentityError("the client certificate is a CA certificate (basicConstraints "
                                "cA true), not an X.509-SVID (X509-SVID spec 4.1: a leaf MUST "
                                "set cA to false)")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityError("the client certificate has no keyUsage extension; an X.509-SVID "
                            "MUST have one (X509-SVID spec 4.3)") from None
    if ku.key_cert_sign or ku.crl_sign:
        raise IdentityError("the client certificate's keyUsage includes keyCertSign or cRLSign; "
                            "a leaf X.509-SVID MUST NOT set them (X509-SVID spec 4.3, 5.2)")
    if not ku.digital_signature:
        raise IdentityError("the client certificate's keyUsage lacks digitalSignature; a leaf "
                            "X.509-SVID MUST set it (X509-SVID spec 4.3)")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise IdentityError("the client certificate's extendedKeyUsage does not include "
                            "clientAuth; an X.509-SVID that has the extension MUST set it "
                            "(X509-SVID spec 4.4)")


def verify_jwt_svid(
    token: str,
    *,
    peer: SpiffeId,
    audience: str,
    bundle_for: Callable[[TrustDomain], JwtBundle | None],
) -> str:
    """Validate a JWT-SVID presented alongside mTLS; returns its ``jti`` (or "").

    Raises:
        IdentityError: the token is invalid, expired, for another audience than
            exactly ``audience``, or its subject is not ``peer``.
    """
    bundle = bundle_for(TrustDomain(peer.trust_domain))
    if bundle is None:
        raise IdentityError(f"no JWT bundle for trust domain {peer.trust_domain!r}")
    try:
        svid = JwtSvid.parse_and_validate(token, bundle, {audience})
    except Exception as exc:  # py-spiffe raises several unrelated error types
        raise IdentityError(f"the JWT-SVID was refused: {_first_line(exc)}") from None
    if set(svid.audience) != {audience}:
        raise IdentityError(
            f"the JWT-SVID's audience must be exactly [{audience!r}], "
            f"not {sorted(svid.audience)!r}"
        )
    if str(svid.spiffe_id) != str(peer):
        raise IdentityError(
            f"the JWT-SVID's subject {svid.spiffe_id} is not the mTLS peer {peer}; "
            "present a JWT-SVID of the same workload"
        )
    # py-spiffe exposes no public accessor for the other claims; read jti from the
    # (already verified) token's payload.
    claims = jwt.decode(token, options={"verify_signature": False})
    return str(claims.get("jti", ""))


class JwtSvidCache:
    """Remembers JWT-SVIDs already verified, so a sidecar reusing its token costs a lookup.

    An entry is keyed by the token's SHA-256 and by the JWT bundle object it was
    verified against (a bundle update invalidates it), and lives until the
    token's ``exp`` or ``max_age`` seconds, whichever is first. Audience and
    subject are part of what was verified, so a hit is only returned for the
    same peer and audience.
    """

    def __init__(self, *, max_entries: int = 4096, max_age: float = 60.0) -> None:
        self._entries: dict[bytes, tuple[object, str, str, str, float]] = {}
        self._max_entries = max_entries
        self._max_age = max_age
        self._lock = threading.Lock()

    def verify(
        self,
        token: str,
        *,
        peer: SpiffeId,
        audience: str,
        bundle_for: Callable[[TrustDomain], JwtBundle | None],
        now: float,
    ) -> str:
        """Like :func:`verify_jwt_svid`, answered from the cache when possible.

        Raises:
            IdentityError: as :func:`verify_jwt_svid`.
        """
        bundle = bundle_for(TrustDomain(peer.trust_domain))
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None:
            cached_bundle, cached_peer, cached_audience, jti, until = hit
            if cached_bundle is bundle and cached_peer == str(peer) \
                    and cached_audience == audience and now < until:
                return jti
        jti = verify_jwt_svid(token, peer=peer, audience=audience, bundle_for=lambda _td: bundle)
        exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._entries = {k: v for k, v in self._entries.items() if v[4] > now}
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()
            self._entries[key] = (bundle, str(peer), audience, jti,
                                  min(exp, now + self._max_age))
        return jti


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
