"""A vendor-hosted agent: a second trust domain (its own DevCA and Workload API) trusted
through SPIFFE federation, its bundle served by an https_web bundle endpoint on loopback."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.core.spiffeid import SpiffeId
from broker.grpc.server import BrokerServer
from broker.wire.federation import (
    BundleEndpoint,
    FederationSource,
    bundle_document,
    parse_bundle_flag,
    parse_endpoint_flag,
)
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi, IssuedX509
from credbroker_dev.devstack import OpenBaoDev
from sidecar.app import SidecarHttpServer, SidecarService
from sidecar.broker_client import BrokerClient
from sidecar.client import SidecarClient
from sidecar.config import SidecarConfig
from tests.integration.conftest import Identity, Sidecar, broker_config, vault_as
from tests.integration.helpers import issue_request, stub, svid

VENDOR = "vendor.example"
VENDOR_AGENT = "spiffe://vendor.example/agent/triage"
MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc-platform, contact: soc@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/agent/triage, spiffe://vendor.example/agent/triage]
    federated: allow
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy: [{path: secret/data/soc/enrichment/*, capabilities: [read]}]
  containment.isolate_host:
    risk: low
    owner: {team: incident-response, contact: ir@example.org}
    escalation: [ir-oncall]
    workloads: [spiffe://example.org/agent/containment, spiffe://vendor.example/agent/*]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy: [{path: secret/data/soc/containment/*, capabilities: [read]}]
"""


def _pem(issued: IssuedX509) -> tuple[bytes, bytes]:
    cert = x509.load_der_x509_certificate(issued.cert_der).public_bytes(
        serialization.Encoding.PEM)
    key = serialization.load_der_private_key(issued.key_der, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return cert, key


@dataclass
class Vendor:
    ca: DevCA
    api: DevWorkloadApi
    endpoint: BundleEndpoint
    web_ca: Path


@pytest.fixture(scope="module")
def vendor(short_tmp: Path) -> Iterator[Vendor]:
    now = datetime.now(UTC)
    ca = DevCA(VENDOR, now=now)
    api = DevWorkloadApi(ca, svid_ttl=timedelta(minutes=30))
    d = short_tmp / "vendor"
    api.add_workload(VENDOR_AGENT, str(d / "triage.sock"))
    api.start()
    web = DevCA("webpki.test", now=now)  # stands in for the public CA of the vendor's site
    cert, key = _pem(web.issue_x509(SpiffeId.parse("spiffe://webpki.test/bundle"), now=now,
                                    ttl=timedelta(hours=1), dns_names=("localhost",)))
    endpoint = BundleEndpoint(lambda: bundle_document([ca.ca_cert], jwks=ca.jwks(),
                                                      refresh_hint=300),
                              cert_pem=cert, key_pem=key).start()
    web_ca = d / "web-ca.pem"
    web_ca.write_bytes(web.bundle_pem)
    yield Vendor(ca=ca, api=api, endpoint=endpoint, web_ca=web_ca)
    endpoint.stop()
    api.stop()


@pytest.fixture(scope="module")
def own_bao(short_tmp: Path) -> Iterator[OpenBaoDev]:
    # Its own OpenBao: a broker brings Vault in line with its map, and this map is not
    # the shared one (its sync would end the other tests' classes).
    server = OpenBaoDev(Path(tempfile.mkdtemp(prefix="fedbao-", dir=short_tmp)))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fed_broker(own_bao: OpenBaoDev, identity: Identity,
               vendor: Vendor) -> Iterator[BrokerServer]:
    bao = own_bao
    scope = Path(tempfile.mkdtemp(prefix="fedmap-", dir=identity.dir.parent)) / "map.yaml"
    scope.write_text(MAP)
    source = parse_endpoint_flag(f"{VENDOR}=https://localhost:{vendor.endpoint.port}/,"
                                 f"ca={vendor.web_ca}")
    server = BrokerServer(broker_config(bao, identity, scope_map_path=scope,
                                        federation=(source,)))
    server.start()
    yield server
    server.stop(grace=1)


def _records(server: BrokerServer) -> list[dict[str, object]]:
    assert server.audit is not None
    return [json.loads(line)["record"] for line in server.audit.path.read_text().splitlines()]


def test_a_vendor_agent_gets_a_credential_and_the_audit_names_its_domain(
        fed_broker: BrokerServer, identity: Identity, vendor: Vendor) -> None:
    # The vendor's agent, with an SVID from the vendor's own Workload API (trusting our
    # trust domain's bundle to verify the broker, as its federation with us provides).
    x509_svid = vendor.api._workloads[0].svid
    assert x509_svid is not None
    agent = stub(fed_broker.port, identity.ca, x509_svid)
    ok = agent.IssueCredential(issue_request("enrichment"), timeout=10)
    assert ok.credential.token
    with pytest.raises(grpc.RpcError) as err:
        agent.IssueCredential(issue_request("containment.isolate_host"), timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert dict(err.value.trailing_metadata())["credbroker-error-code"] == \
        "federated_not_allowed"
    decisions = [r for r in _records(fed_broker) if r.get("type") == "decision"
                 and r.get("spiffe_id") == VENDOR_AGENT]
    assert [r.get("federated_from") for r in decisions] == [VENDOR, VENDOR]
    minted = [r for r in _records(fed_broker) if r.get("type") == "credential.minted"
              and r.get("spiffe_id") == VENDOR_AGENT]
    assert minted and minted[0]["federated_from"] == VENDOR
    loaded = [r for r in _records(fed_broker) if r.get("type") == "federation.bundle"]
    assert loaded and loaded[0]["trust_domain"] == VENDOR


def test_a_vendor_ca_cannot_vouch_for_one_of_our_workloads(
        fed_broker: BrokerServer, identity: Identity, vendor: Vendor) -> None:
    # The vendor's CA is a TLS root now, so the handshake succeeds: the identity check
    # must refuse an SVID of example.org that the vendor's CA signed.
    forged = svid(vendor.ca, "spiffe://example.org/agent/containment")
    with pytest.raises(grpc.RpcError) as err:
        stub(fed_broker.port, identity.ca, forged).IssueCredential(
            issue_request("enrichment"), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "does not chain to the bundle of its own trust domain" in str(err.value.details())
    # a genuine vendor SVID over raw gRPC works, and a third, unfederated domain is refused
    ok = stub(fed_broker.port, identity.ca, svid(vendor.ca, VENDOR_AGENT)).IssueCredential(
        issue_request("enrichment"), timeout=10)
    assert ok.credential.token
    stranger = DevCA("stranger.example", now=datetime.now(UTC))
    with pytest.raises(grpc.RpcError) as err:
        stub(fed_broker.port, identity.ca, svid(stranger, "spiffe://stranger.example/a"))\
            .IssueCredential(issue_request("enrichment"), timeout=10)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_trace_and_export_show_the_foreign_trust_domain(fed_broker: BrokerServer,
                                                         identity: Identity,
                                                         vendor: Vendor) -> None:
    from broker.core.audittrace import to_ocsf, trace, trace_lines

    ok = stub(fed_broker.port, identity.ca, svid(vendor.ca, VENDOR_AGENT)).IssueCredential(
        issue_request("enrichment"), timeout=10)
    records = _records(fed_broker)
    t = trace(records, ok.request_id)
    assert t is not None
    text = "\n".join(trace_lines(t, datetime.now(UTC)))
    assert "federated: a workload of the foreign trust domain vendor.example" in text
    decision = next(r for r in records if r.get("type") == "decision"
                    and r.get("request_id") == ok.request_id)
    event = to_ocsf(decision)
    assert event["actor"]["user"]["domain"] == VENDOR
    assert "(federated trust domain vendor.example)" in event["message"]


def _vendor_sidecar(vendor: Vendor, broker: BrokerServer, sock: Path,
                    broker_trust: FederationSource | None) -> Sidecar:
    cfg = SidecarConfig(listen_socket=sock,
                        workload_api_socket="unix:" + vendor.api._workloads[0].socket_path,
                        broker_addr=f"127.0.0.1:{broker.port}", broker_trust=broker_trust)
    service = SidecarService(BrokerClient(cfg))
    http = SidecarHttpServer(cfg.listen_socket, service)
    http.serve_in_thread()
    return Sidecar(client=SidecarClient(str(sock)), service=service, http=http)


def _close(sc: Sidecar) -> None:
    sc.http.close()
    sc.service.client.close()


def test_a_vendor_agent_through_its_own_sidecar(
        fed_broker: BrokerServer, identity: Identity, vendor: Vendor, own_bao: OpenBaoDev,
        short_tmp: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="vsc-", dir=short_tmp))
    # Without the broker's trust domain the vendor's sidecar cannot verify the broker.
    sc = _vendor_sidecar(vendor, fed_broker, d / "plain.sock", None)
    try:
        status, body = sc.client.raw("POST", "/v1/credentials", {"action_class": "enrichment"})
        assert status == 401 and body["error"]["code"] == "unauthenticated", body  # type: ignore[index]
        assert "could not verify the broker's certificate" in body["error"]["message"]  # type: ignore[index]
    finally:
        _close(sc)
    # Our bundle as PEM (what the federation with us hands the vendor), from a file ...
    ours = d / "example.org.pem"
    ours.write_bytes(identity.ca.bundle_pem)
    # ... and as a SPIFFE bundle from our bundle endpoint (https_web).
    now = datetime.now(UTC)
    web = DevCA("webpki.test", now=now)
    cert, key = _pem(web.issue_x509(SpiffeId.parse("spiffe://webpki.test/ours"), now=now,
                                    ttl=timedelta(hours=1), dns_names=("localhost",)))
    endpoint = BundleEndpoint(lambda: bundle_document([identity.ca.ca_cert]), cert_pem=cert,
                              key_pem=key).start()
    (d / "web.pem").write_bytes(web.bundle_pem)
    try:
        for name, source in (
                ("file", parse_bundle_flag(f"example.org={ours}", flag="--broker-bundle")),
                ("endpoint", parse_endpoint_flag(
                    f"example.org=https://localhost:{endpoint.port}/,ca={d / 'web.pem'}",
                    flag="--broker-bundle-endpoint"))):
            sc = _vendor_sidecar(vendor, fed_broker, d / f"{name}.sock", source)
            try:
                got = sc.client.request_credential("enrichment")
            finally:
                _close(sc)
            # OpenBao knows the token (the world's word, not the broker's).
            root = vault_as(own_bao, own_bao.root_token)
            assert root.auth.token.lookup(got["token"])["data"]["ttl"] > 0
            decision = next(r for r in _records(fed_broker) if r.get("type") == "decision"
                            and r.get("request_id") == got["request_id"])
            assert decision["spiffe_id"] == VENDOR_AGENT
            assert decision["federated_from"] == VENDOR
    finally:
        endpoint.stop()
