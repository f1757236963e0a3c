"""Peer-certificate checks (X509-SVID spec) — pure, with certificates from the dev CA code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.core.spiffeid import SpiffeId
from broker.devspiffe import DevCA
from broker.errors import IdentityError
from broker.identity import spiffe_id_from_certificate

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CA = DevCA("example.org", now=NOW)


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _cert(sans: list[x509.GeneralName], *, ca: bool = False) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(7)
               .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_a_good_svid_yields_its_id_and_serial() -> None:
    issued = CA.issue_x509(SpiffeId.parse("spiffe://example.org/agent/a"), now=NOW,
                           ttl=timedelta(minutes=5))
    sid, serial = spiffe_id_from_certificate(_pem(issued.cert_der), trust_domain="example.org",
                                             now=NOW)
    assert str(sid) == "spiffe://example.org/agent/a"
    assert serial == format(issued.serial, "x")


@pytest.mark.parametrize(("pem", "words"), [
    (_cert([]), "0 URI SANs"),
    (_cert([x509.UniformResourceIdentifier("spiffe://example.org/a"),
            x509.UniformResourceIdentifier("spiffe://example.org/b")]), "2 URI SANs"),
    (_cert([x509.UniformResourceIdentifier("https://example.org/a")]), "not a SPIFFE ID"),
    (_cert([x509.UniformResourceIdentifier("spiffe://example.org/a/../b")]), "not a SPIFFE ID"),
    (_cert([x509.UniformResourceIdentifier("spiffe://other.org/a")]), "trust domain 'other.org'"),
    (_cert([x509.UniformResourceIdentifier("spiffe://example.org/a")], ca=True),
     "CA certificate"),
    (b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", "could not be parsed"),
])
def test_unacceptable_certificates(pem: bytes, words: str) -> None:
    with pytest.raises(IdentityError) as err:
        spiffe_id_from_certificate(pem, trust_domain="example.org", now=NOW)
    assert words in str(err.value)


def test_outside_validity_window() -> None:
    issued = CA.issue_x509(SpiffeId.parse("spiffe://example.org/a"), now=NOW,
                           ttl=timedelta(minutes=5))
    with pytest.raises(IdentityError, match="not valid at"):
        spiffe_id_from_certificate(_pem(issued.cert_der), trust_domain="example.org",
                                   now=NOW + timedelta(minutes=6))
