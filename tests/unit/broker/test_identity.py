"""Peer-certificate checks (X509-SVID spec) — pure, with certificates from the dev CA code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.core.spiffeid import SpiffeId
from broker.errors import IdentityError
from broker.grpc.identity import spiffe_id_from_certificate
from credbroker_dev.devspiffe import DevCA

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CA = DevCA("example.org", now=NOW)


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


GOOD_SAN = [x509.UniformResourceIdentifier("spiffe://example.org/a")]


def _usage(*, digital_signature: bool = True, key_cert_sign: bool = False,
           crl_sign: bool = False, key_agreement: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=key_agreement, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _cert(sans: list[x509.GeneralName], *, ca: bool | None = False,
          usage: x509.KeyUsage | None = None, with_usage: bool = True,
          eku: list[x509.ObjectIdentifier] | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(7)
               .not_valid_before(NOW - timedelta(hours=1))
               .not_valid_after(NOW + timedelta(hours=1)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                        critical=True)
    if with_usage:
        builder = builder.add_extension(usage or _usage(), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
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
    # X509-SVID spec 4.3 / 5.2: a leaf's key usage.
    (_cert(GOOD_SAN, usage=_usage(key_cert_sign=True)), "MUST NOT set them"),
    (_cert(GOOD_SAN, usage=_usage(crl_sign=True)), "keyCertSign or cRLSign"),
    (_cert(GOOD_SAN, usage=_usage(digital_signature=False, key_agreement=True)),
     "lacks digitalSignature"),
    (_cert(GOOD_SAN, with_usage=False), "no keyUsage extension"),
    # 4.4: when present, the extended key usage must allow client authentication.
    (_cert(GOOD_SAN, eku=[ExtendedKeyUsageOID.SERVER_AUTH]), "does not include clientAuth"),
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


@pytest.mark.parametrize("pem", [
    _cert(GOOD_SAN, ca=None),  # no basicConstraints: cA defaults to false (RFC 5280)
    _cert(GOOD_SAN, usage=_usage(key_agreement=True)),  # MAY set keyAgreement
    _cert(GOOD_SAN, eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
])
def test_spec_conformant_variants_are_accepted(pem: bytes) -> None:
    sid, _ = spiffe_id_from_certificate(pem, trust_domain="example.org", now=NOW)
    assert str(sid) == "spiffe://example.org/a"


def test_the_dev_ca_can_issue_a_leaf_the_broker_refuses() -> None:
    issued = CA.issue_x509(SpiffeId.parse("spiffe://example.org/a"), now=NOW,
                           ttl=timedelta(minutes=5), key_usage=_usage(key_cert_sign=True))
    with pytest.raises(IdentityError, match="keyCertSign"):
        spiffe_id_from_certificate(_pem(issued.cert_der), trust_domain="example.org", now=NOW)
