"""SPIFFE federation: bundles (files and endpoints), the per-trust-domain chain check,
and the scope map's `federated` setting."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.core.models import CredentialRequest, DenyCode, Outcome
from broker.core.scopemap import evaluate, parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import ConfigError, IdentityError, ScopeMapError
from broker.grpc.identity import check_chain, spiffe_id_from_certificate
from broker.wire.federation import (
    BundleEndpoint,
    BundleError,
    FederatedBundles,
    bundle_document,
    fetch_endpoint,
    parse_bundle,
    parse_bundle_flag,
    parse_endpoint_flag,
    refresh_seconds,
)
from credbroker_dev.devspiffe import DevCA, IssuedX509

NOW = datetime.now(UTC)
VENDOR = "vendor.example"


@pytest.fixture(scope="module")
def ours() -> DevCA:
    return DevCA("example.org", now=NOW)


@pytest.fixture(scope="module")
def vendor() -> DevCA:
    return DevCA(VENDOR, now=NOW)


def pem(issued: IssuedX509) -> bytes:
    return x509.load_der_x509_certificate(issued.cert_der).public_bytes(
        serialization.Encoding.PEM)


def key_pem(issued: IssuedX509) -> bytes:
    key = serialization.load_der_private_key(issued.key_der, None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- the bundle format -----------------------------------------------------------------


def test_a_bundle_carries_x509_authorities_jwt_keys_and_the_hints(vendor: DevCA) -> None:
    doc = bundle_document([vendor.ca_cert], jwks=vendor.jwks(), refresh_hint=60, sequence=3)
    b = parse_bundle(VENDOR, doc)
    assert b.x509_authorities == (vendor.ca_cert,)
    assert b.jwt_bundle is not None and b.refresh_hint == 60 and b.sequence == 3
    assert refresh_seconds(b) == 60
    # keys of another use are ignored (spec: unknown uses are skipped)
    raw = json.loads(doc)
    raw["keys"].append({"use": "something-else", "kty": "oct"})
    assert parse_bundle(VENDOR, json.dumps(raw).encode()).x509_authorities == b.x509_authorities


@pytest.mark.parametrize(("doc", "says"), [
    (b"not json", "not JSON"),
    (b"{}", "no 'keys' list"),
    (b'{"keys": []}', "no x509-svid or jwt-svid key"),
    (b'{"keys": [{"use": "x509-svid", "x5c": []}]}', "exactly one certificate"),
    (b'{"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}', "not a base64 DER"),
    (b'{"keys": [{"use": "jwt-svid", "kty": "EC"}]}', "has no kid"),
])
def test_a_malformed_bundle_is_refused_saying_why(doc: bytes, says: str) -> None:
    with pytest.raises(BundleError, match=says):
        parse_bundle(VENDOR, doc)


def test_a_bad_refresh_hint_is_refused(vendor: DevCA) -> None:
    raw = json.loads(bundle_document([vendor.ca_cert]))
    raw["spiffe_refresh_hint"] = "soon"
    with pytest.raises(BundleError, match="spiffe_refresh_hint"):
        parse_bundle(VENDOR, json.dumps(raw).encode())


def test_the_refresh_hint_is_clamped() -> None:
    assert refresh_seconds(None) == 300
    b = parse_bundle(VENDOR, json.dumps({"keys": [{"use": "x509-svid", "x5c": [
        base64.b64encode(DevCA("a.b", now=NOW).bundle_der).decode()]}],
        "spiffe_refresh_hint": 0}).encode())
    assert refresh_seconds(b) == 300


# --- configuration ----------------------------------------------------------------------


def test_flags_parse_and_refuse_what_they_cannot_use() -> None:
    s = parse_bundle_flag("vendor.example=/etc/vendor.json")
    assert s.trust_domain == VENDOR and s.path == Path("/etc/vendor.json")
    e = parse_endpoint_flag("spiffe://vendor.example=https://b.vendor.example/bundle,"
                            "profile=https_spiffe,spiffe-id=spiffe://vendor.example/spire,"
                            "bundle=/etc/first.json")
    assert (e.trust_domain, e.profile, e.endpoint_spiffe_id) == \
        (VENDOR, "https_spiffe", "spiffe://vendor.example/spire")
    for bad, says in [("vendor.example", "TRUST_DOMAIN=PATH")]:
        with pytest.raises(ConfigError, match=says):
            parse_bundle_flag(bad)
    for bad, says in [
        ("vendor.example=http://x/", "over https only"),
        ("vendor.example=https://x/,profile=ftp", "https_web or https_spiffe"),
        ("vendor.example=https://x/,profile=https_spiffe", "needs spiffe-id"),
        ("vendor.example=https://x/,colour=red", "unknown setting"),
        ("Vendor.Example=https://x/", "lower-case"),
        ("spiffe://vendor.example/agent=https://x/", "not a trust domain"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_endpoint_flag(bad)
    with pytest.raises(ConfigError, match="federated twice"):
        FederatedBundles([s, s])
    with pytest.raises(ConfigError, match="own trust domain"):
        FederatedBundles([parse_bundle_flag("example.org=/x")], local_trust_domain="example.org")


def test_a_static_bundle_file_is_reread_when_it_changes(tmp_path: Path, vendor: DevCA) -> None:
    path = tmp_path / "vendor.json"
    path.write_bytes(bundle_document([vendor.ca_cert], sequence=1))
    clock = [0.0]
    fed = FederatedBundles([parse_bundle_flag(f"{VENDOR}={path}")], clock=lambda: clock[0])
    seen: list[str] = []
    fed.on_update = lambda td, b, where: seen.append(f"{td} {b.sequence} {where}")
    fed.load()
    assert fed.x509_authorities(VENDOR) == (vendor.ca_cert,) and fed.generation == 1
    rotated = DevCA(VENDOR, now=NOW)
    path.write_bytes(bundle_document([vendor.ca_cert, rotated.ca_cert], sequence=2))
    import os
    os.utime(path, (1, 1))  # a different mtime, whatever the file system's resolution
    clock[0] = 10.0
    fed.poll_due()
    assert fed.x509_authorities(VENDOR) == (vendor.ca_cert, rotated.ca_cert)
    assert fed.generation == 2 and len(seen) == 2
    assert rotated.bundle_pem in fed.x509_roots_pem()
    # a broken file keeps the bundle it had; an older sequence never replaces a newer one
    path.write_text("{")
    os.utime(path, (2, 2))
    clock[0] = 20.0
    fed.poll_due()
    assert fed.generation == 2
    path.write_bytes(bundle_document([vendor.ca_cert], sequence=1))
    os.utime(path, (3, 3))
    clock[0] = 30.0
    fed.poll_due()
    assert fed.x509_authorities(VENDOR) == (vendor.ca_cert, rotated.ca_cert)


def test_a_static_bundle_file_that_cannot_be_read_stops_the_start(tmp_path: Path) -> None:
    fed = FederatedBundles([parse_bundle_flag(f"{VENDOR}={tmp_path / 'missing.json'}")])
    with pytest.raises(BundleError, match=r"cannot read the bundle of vendor.example"):
        fed.load()


# --- bundle endpoints ----------------------------------------------------------------------


@pytest.fixture
def web_endpoint(tmp_path: Path,
                 vendor: DevCA) -> Iterator[tuple[BundleEndpoint, Path, list[bytes]]]:
    web_ca = DevCA("webpki.test", now=NOW)  # stands in for a public CA
    server = web_ca.issue_x509(SpiffeId.parse("spiffe://webpki.test/bundle"), now=NOW,
                               ttl=timedelta(hours=1), dns_names=("localhost",))
    served = [bundle_document([vendor.ca_cert], jwks=vendor.jwks(), refresh_hint=2,
                              sequence=1)]
    ep = BundleEndpoint(lambda: served[0], cert_pem=pem(server), key_pem=key_pem(server)).start()
    ca_path = tmp_path / "web-ca.pem"
    ca_path.write_bytes(web_ca.bundle_pem)
    yield ep, ca_path, served
    ep.stop()


def test_an_https_web_endpoint_is_polled_per_its_refresh_hint(
        web_endpoint: tuple[BundleEndpoint, Path, list[bytes]], vendor: DevCA) -> None:
    ep, ca_path, served = web_endpoint
    url = f"https://localhost:{ep.port}/"
    clock = [0.0]
    fed = FederatedBundles([parse_endpoint_flag(f"{VENDOR}={url},ca={ca_path}")],
                           clock=lambda: clock[0])
    fed.load()
    assert fed.x509_authorities(VENDOR) == (vendor.ca_cert,)
    assert fed.jwt_bundle(VENDOR) is not None
    rotated = DevCA(VENDOR, now=NOW)
    served[0] = bundle_document([rotated.ca_cert], refresh_hint=2, sequence=2)
    clock[0] = 1.0
    assert fed.poll_due() == pytest.approx(1.0)  # not due yet: the hint is 2 s
    assert fed.x509_authorities(VENDOR) == (vendor.ca_cert,)
    clock[0] = 2.0
    fed.poll_due()
    assert fed.x509_authorities(VENDOR) == (rotated.ca_cert,)


def test_an_https_web_endpoint_with_an_untrusted_certificate_is_refused(
        web_endpoint: tuple[BundleEndpoint, Path, list[bytes]], tmp_path: Path) -> None:
    ep, _, _ = web_endpoint
    other = tmp_path / "other-ca.pem"
    other.write_bytes(DevCA("other.test", now=NOW).bundle_pem)
    source = parse_endpoint_flag(f"{VENDOR}=https://localhost:{ep.port}/,ca={other}")
    with pytest.raises(BundleError, match="presented a certificate we refuse"):
        fetch_endpoint(source, previous=None)
    # and it is not a start-up error: the domain simply has no bundle until it answers
    fed = FederatedBundles([source])
    fed.load()
    assert fed.x509_authorities(VENDOR) == ()


def test_an_https_spiffe_endpoint_must_present_the_spiffe_id_configured(
        tmp_path: Path, vendor: DevCA) -> None:
    svid = vendor.issue_x509(SpiffeId.parse("spiffe://vendor.example/spire/server"), now=NOW,
                             ttl=timedelta(hours=1))
    ep = BundleEndpoint(lambda: bundle_document([vendor.ca_cert], sequence=7),
                        cert_pem=pem(svid), key_pem=key_pem(svid)).start()
    first = tmp_path / "first.json"
    first.write_bytes(bundle_document([vendor.ca_cert], sequence=1))
    try:
        good = parse_endpoint_flag(
            f"{VENDOR}=https://127.0.0.1:{ep.port}/,profile=https_spiffe,"
            f"spiffe-id=spiffe://vendor.example/spire/server,bundle={first}")
        fed = FederatedBundles([good])
        fed.load()
        assert fed.bundles()[VENDOR].sequence == 7
        wrong = parse_endpoint_flag(
            f"{VENDOR}=https://127.0.0.1:{ep.port}/,profile=https_spiffe,"
            f"spiffe-id=spiffe://vendor.example/other,bundle={first}")
        with pytest.raises(BundleError, match=r"not spiffe://vendor.example/other"):
            fetch_endpoint(wrong, previous=parse_bundle(VENDOR, first.read_bytes()))
        stranger = DevCA(VENDOR, now=NOW)  # same name, another CA: not the previous bundle
        with pytest.raises(BundleError, match="refuse"):
            fetch_endpoint(good, previous=parse_bundle(
                VENDOR, bundle_document([stranger.ca_cert])))
    finally:
        ep.stop()


# --- identity: a certificate must chain to its own trust domain's bundle ---------------------


def test_a_federated_svid_is_accepted_only_from_a_federated_domain(vendor: DevCA) -> None:
    agent = vendor.issue_x509(SpiffeId.parse("spiffe://vendor.example/agent/triage"), now=NOW,
                              ttl=timedelta(minutes=5))
    with pytest.raises(IdentityError, match=r"serves only 'example.org'"):
        spiffe_id_from_certificate(pem(agent), trust_domain="example.org", now=NOW)
    sid, _ = spiffe_id_from_certificate(pem(agent), trust_domain="example.org", now=NOW,
                                        federated=frozenset({VENDOR}))
    assert sid.trust_domain == VENDOR
    check_chain(pem(agent), (vendor.ca_cert,), trust_domain=VENDOR, now=NOW)


def test_a_vendor_ca_never_vouches_for_our_trust_domain(ours: DevCA, vendor: DevCA) -> None:
    forged = vendor.issue_x509(SpiffeId.parse("spiffe://example.org/agent/containment"),
                               now=NOW, ttl=timedelta(minutes=5))
    with pytest.raises(IdentityError,
                       match=r"does not chain to the bundle of its own trust domain 'example\.org"):
        check_chain(pem(forged), (ours.ca_cert,), trust_domain="example.org", now=NOW)
    with pytest.raises(IdentityError, match=r"no X.509 bundle for trust domain"):
        check_chain(pem(forged), (), trust_domain=VENDOR, now=NOW)


# --- the scope map's federated setting ------------------------------------------------------

MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc, contact: soc@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/agent/*, spiffe://vendor.example/agent/triage]
    federated: allow
    credential: {ttl: 1m, max_ttl: 2m, vault_policy: [{path: secret/data/x, capabilities: [read]}]}
  lookup:
    risk: low
    owner: {team: soc, contact: soc@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://vendor.example/agent/*]
    credential: {ttl: 1m, max_ttl: 2m, vault_policy: [{path: secret/data/x, capabilities: [read]}]}
  tickets:
    risk: low
    owner: {team: soc, contact: soc@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://vendor.example/agent/triage, spiffe://example.org/agent/triage]
    federated: approval
    federated_approvers: [vendor-managers]
    credential: {ttl: 1m, max_ttl: 2m, vault_policy: [{path: secret/data/x, capabilities: [read]}]}
"""
VENDOR_TRIAGE = SpiffeId.parse("spiffe://vendor.example/agent/triage")


def test_federated_callers_are_denied_unless_the_class_says_otherwise() -> None:
    m = parse_scope_map([("map.yaml", MAP)])
    assert m.classes["lookup"].federated == "deny"

    def decide(cls: str, sid: SpiffeId, fed: str) -> object:
        return evaluate(m, sid, CredentialRequest(action_class=cls), NOW, federated_from=fed)

    d = decide("lookup", VENDOR_TRIAGE, VENDOR)
    assert d.outcome is Outcome.DENY and d.deny_code is DenyCode.FEDERATED_NOT_ALLOWED
    assert "federated trust domain 'vendor.example'" in d.reasons[0]
    assert decide("enrichment", VENDOR_TRIAGE, VENDOR).outcome is Outcome.ALLOW
    d = decide("tickets", VENDOR_TRIAGE, VENDOR)
    assert d.outcome is Outcome.NEEDS_APPROVAL and d.rule == "tickets.federated"
    assert "vendor-managers" in d.reasons[0]
    # our own workload needs no approval for the same class
    local = SpiffeId.parse("spiffe://example.org/agent/triage")
    assert decide("tickets", local, "").outcome is Outcome.ALLOW
    assert m.classes["tickets"].approval_rule is not None


def test_a_wildcard_never_crosses_trust_domains() -> None:
    m = parse_scope_map([("map.yaml", MAP)])
    # spiffe://example.org/agent/* does not match the vendor's agent of the same path
    other = SpiffeId.parse("spiffe://vendor.example/agent/enrich")
    d = evaluate(m, other, CredentialRequest(action_class="enrichment"), NOW,
                 federated_from=VENDOR)
    assert d.deny_code is DenyCode.WORKLOAD_NOT_ALLOWED


def test_federated_approval_needs_approvers() -> None:
    bad = MAP.replace("    federated_approvers: [vendor-managers]\n", "")
    with pytest.raises(ScopeMapError, match=r"tickets.federated: approval needs approvers"):
        parse_scope_map([("map.yaml", bad)])
    bad = MAP.replace("federated: allow", "federated_approvers: [x]")
    with pytest.raises(ScopeMapError, match="only used with federated: approval"):
        parse_scope_map([("map.yaml", bad)])
    bad = MAP.replace("federated: allow", "federated: sometimes")
    with pytest.raises(ScopeMapError, match="federated"):
        parse_scope_map([("map.yaml", bad)])


def test_a_bundle_may_be_pem_ca_certificates(vendor: DevCA) -> None:
    b = parse_bundle(VENDOR, b"\n" + vendor.bundle_pem)
    assert b.x509_authorities == (vendor.ca_cert,) and b.jwt_bundle is None
    with pytest.raises(BundleError, match="PEM but not CA certificates"):
        parse_bundle(VENDOR, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_the_sidecar_trusts_the_brokers_domain_by_file_and_or_endpoint(tmp_path: Path) -> None:
    from sidecar.config import sidecar_config_from

    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:/run/w.sock", "CREDBROKER_BROKER_ADDR": "b:8443"}
    flags: dict[str, object] = {"listen": str(tmp_path / "s.sock")}
    assert sidecar_config_from(env=env, flags=flags).broker_trust is None
    f = sidecar_config_from(env=env, flags={**flags, "broker_bundle": "example.org=/b.pem"})
    assert f.broker_trust is not None and f.broker_trust.path == Path("/b.pem")
    both = sidecar_config_from(env={**env, "CREDBROKER_BROKER_BUNDLE_ENDPOINT":
                                    "example.org=https://spire.example.org/bundle"},
                               flags={**flags, "broker_bundle": "example.org=/b.json"})
    assert both.broker_trust is not None
    assert both.broker_trust.url == "https://spire.example.org/bundle"
    assert both.broker_trust.path == Path("/b.json")  # the first bundle, then the endpoint
    with pytest.raises(ConfigError, match="both are the broker's trust domain"):
        sidecar_config_from(env=env, flags={**flags, "broker_bundle": "a.example=/b.json",
                                            "broker_bundle_endpoint":
                                            "b.example=https://x.example/"})
    with pytest.raises(ConfigError, match="--broker-bundle 'nope'"):
        sidecar_config_from(env=env, flags={**flags, "broker_bundle": "nope"})
