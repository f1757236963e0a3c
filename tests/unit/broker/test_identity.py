"""Peer-certificate checks (X509-SVID spec) — pure, with certificates from the dev CA code."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.core.spiffeid import SpiffeId
from broker.errors import IdentityError
from broker.grpc.identity import check_chain, spiffe_id_from_certificate
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


def _cert(sans: Sequence[x509.GeneralName], *, ca: bool | None = False,
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


def test_x509_svid_valid_from_not_before_through_not_after_inclusive() -> None:
    """RFC 5280 4.1.2.5: the validity period includes both of its ends."""
    issued = CA.issue_x509(SpiffeId.parse("spiffe://example.org/a"), now=NOW,
                           ttl=timedelta(minutes=5), not_before=NOW)
    for at in (NOW, NOW + timedelta(minutes=5)):
        sid, _ = spiffe_id_from_certificate(_pem(issued.cert_der), trust_domain="example.org",
                                            now=at)
        assert str(sid) == "spiffe://example.org/a"
    for at in (NOW - timedelta(seconds=1), NOW + timedelta(minutes=5, seconds=1)):
        with pytest.raises(IdentityError, match="not valid at"):
            spiffe_id_from_certificate(_pem(issued.cert_der), trust_domain="example.org",
                                       now=at)


def test_outside_validity_window() -> None:
    issued = CA.issue_x509(SpiffeId.parse("spiffe://example.org/a"), now=NOW,
                           ttl=timedelta(minutes=5))
    with pytest.raises(IdentityError, match="not valid at"):
        spiffe_id_from_certificate(_pem(issued.cert_der), trust_domain="example.org",
                                   now=NOW + timedelta(minutes=6))


@pytest.mark.parametrize(("pem", "message"), [
    (_cert(GOOD_SAN, ca=True),
     "the client certificate is a CA certificate (basicConstraints cA true), not an X.509-SVID "
     "(X509-SVID spec 4.1: a leaf MUST set cA to false)"),
    (_cert(GOOD_SAN, with_usage=False),
     "the client certificate has no keyUsage extension; an X.509-SVID MUST have one "
     "(X509-SVID spec 4.3)"),
    (_cert(GOOD_SAN, usage=_usage(key_cert_sign=True)),
     "the client certificate's keyUsage includes keyCertSign or cRLSign; a leaf X.509-SVID "
     "MUST NOT set them (X509-SVID spec 4.3, 5.2)"),
    (_cert(GOOD_SAN, usage=_usage(digital_signature=False, key_agreement=True)),
     "the client certificate's keyUsage lacks digitalSignature; a leaf X.509-SVID MUST set it "
     "(X509-SVID spec 4.3)"),
    (_cert(GOOD_SAN, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
     "the client certificate's extendedKeyUsage does not include clientAuth; an X.509-SVID "
     "that has the extension MUST set it (X509-SVID spec 4.4)"),
])
def test_x509_svid_4_each_refusal_names_the_rule_it_breaks_in_full(pem: bytes,
                                                                    message: str) -> None:
    """The operator reads which rule of X509-SVID §4.1/§4.3/§4.4 the certificate breaks."""
    with pytest.raises(IdentityError) as err:
        spiffe_id_from_certificate(pem, trust_domain="example.org", now=NOW)
    assert str(err.value) == message


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


# --- check_chain: the path from the leaf to its own trust domain's bundle --------------------
# X509-SVID spec 5 (validation): a chain to a trust bundle of the SPIFFE ID's trust domain,
# through CA certificates (4.1: cA true) each within its validity.

CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False)


class _Node:
    """A certificate and its key: a root, an intermediate or a leaf, built here in full."""

    def __init__(self, cn: str, *, parent: _Node | None = None, ca: bool = True,
                 not_before: datetime = NOW - timedelta(hours=1),
                 not_after: datetime = NOW + timedelta(hours=1)) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer = parent or self
        builder = (x509.CertificateBuilder().subject_name(self.name)
                   .issuer_name(issuer.name).public_key(self.key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(CA_USAGE if ca else _usage(), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(GOOD_SAN),
                                            critical=False)
        self.cert = builder.sign(issuer.key, hashes.SHA256())

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _chain(*nodes: _Node | bytes) -> bytes:
    return b"".join(n if isinstance(n, bytes) else n.pem for n in nodes)


def _path(root: _Node, depth: int) -> list[_Node]:
    """A leaf under ``depth`` intermediates under ``root``: leaf first, as a peer sends it."""
    nodes = [root]
    for i in range(depth):
        nodes.append(_Node(f"intermediate {i}", parent=nodes[-1]))
    leaf = _Node("leaf", parent=nodes[-1], ca=False)
    return [leaf, *reversed(nodes[1:])]


def _chains(chain_pem: bytes, *authorities: _Node, now: datetime = NOW) -> bool:
    try:
        check_chain(chain_pem, [a.cert for a in authorities], trust_domain="example.org",
                    now=now)
    except IdentityError as exc:
        assert "does not chain to the bundle of its own trust domain 'example.org'" in str(exc)
        return False
    return True


def test_x509_svid_5_a_leaf_chains_through_the_intermediates_the_peer_presents() -> None:
    root = _Node("root")
    leaf, *intermediates = _path(root, 2)
    assert _chains(_chain(leaf, *intermediates), root)
    # presented in any order after the leaf
    assert _chains(_chain(leaf, *reversed(intermediates)), root)
    # a missing link is no path
    assert not _chains(_chain(leaf, intermediates[1]), root)
    assert not _chains(leaf.pem, root)
    # another root signs nothing here
    assert not _chains(_chain(leaf, *intermediates), _Node("other root"))
    # the root may be one of several authorities of the bundle
    assert _chains(_chain(leaf, *intermediates), _Node("other root"), root)


def test_x509_svid_5_the_path_is_at_most_eight_certificates_below_the_bundle() -> None:
    root = _Node("root")
    assert _chains(_chain(*_path(root, 7)), root)
    assert not _chains(_chain(*_path(root, 8)), root)


def test_x509_svid_4_1_an_intermediate_must_be_a_ca_certificate() -> None:
    root = _Node("root")
    not_ca = _Node("signs but is a leaf", parent=root, ca=False)
    leaf = _Node("leaf", parent=not_ca, ca=False)
    assert not _chains(_chain(leaf, not_ca), root)
    no_constraints = _Node("no basicConstraints", parent=root)
    # rebuild it without basicConstraints: absent means cA false (RFC 5280 4.2.1.9)
    bare = (x509.CertificateBuilder().subject_name(no_constraints.name)
            .issuer_name(root.name).public_key(no_constraints.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(hours=1))
            .sign(root.key, hashes.SHA256()))
    leaf2 = _Node("leaf", parent=no_constraints, ca=False)
    assert not _chains(_chain(leaf2, bare.public_bytes(serialization.Encoding.PEM)), root)
    assert _chains(_chain(leaf2, no_constraints), root)


@pytest.mark.parametrize("which", ["root", "intermediate"])
def test_x509_svid_5_every_certificate_on_the_path_is_within_its_validity(which: str) -> None:
    minute = NOW.replace(second=0, microsecond=0)
    for window, ok in [
        ((minute, minute + timedelta(hours=1)), True),   # valid from this very minute
        ((minute - timedelta(hours=1), minute), True),   # valid until this very minute
        ((minute + timedelta(minutes=1), minute + timedelta(hours=1)), False),  # not yet
        ((minute - timedelta(hours=1), minute - timedelta(minutes=1)), False),  # expired
    ]:
        before, after = window
        if which == "root":
            root = _Node("root", not_before=before, not_after=after)
            mid = _Node("intermediate", parent=root)
        else:
            root = _Node("root")
            mid = _Node("intermediate", parent=root, not_before=before, not_after=after)
        leaf = _Node("leaf", parent=mid, ca=False)
        now = minute + timedelta(seconds=30, microseconds=5)
        assert _chains(_chain(leaf, mid), root, now=now) is ok, window


def test_x509_svid_5_an_unreadable_chain_is_no_path() -> None:
    assert not _chains(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
                       _Node("root"))


def test_x509_svid_5_a_name_match_without_the_signature_is_no_path() -> None:
    root = _Node("root")
    impostor = _Node("root")  # same subject name, another key
    leaf = _Node("leaf", parent=impostor, ca=False)
    assert not _chains(leaf.pem, root)
    mid = _Node("intermediate", parent=root)
    fake_mid = _Node("intermediate", parent=root)  # same name as mid, another key
    leaf2 = _Node("leaf", parent=mid, ca=False)
    assert not _chains(_chain(leaf2, fake_mid), root)
    assert _chains(_chain(leaf2, fake_mid, mid), root)


def test_x509_svid_5_chain_refusals_say_what_is_wrong_in_full() -> None:
    root = _Node("root")
    with pytest.raises(IdentityError) as err:
        check_chain(_Node("leaf", parent=_Node("other"), ca=False).pem, [root.cert],
                    trust_domain="example.org", now=NOW)
    assert str(err.value) == (
        "the client certificate does not chain to the bundle of its own trust domain "
        "'example.org': another trust domain's CA may not vouch for it")
    with pytest.raises(IdentityError) as err:
        check_chain(_Node("leaf", parent=root, ca=False).pem, [], trust_domain="example.org",
                    now=NOW)
    assert str(err.value) == ("no X.509 bundle for trust domain 'example.org' (yet): its "
                              "workloads cannot be verified")
