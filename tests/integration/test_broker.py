"""The broker over real gRPC mTLS against real OpenBao, with SVIDs from the dev CA."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import hvac
import hvac.exceptions
import pytest
from cryptography import x509

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.grpc.server import BrokerServer
from broker.options import DEFAULT_BROKER_DNS
from broker.wire.metadata import DECISION_MD_KEY, ERROR_CODE_MD_KEY
from broker.wire.tls import PemMaterial, diagnose_handshake
from credbroker_dev.devspiffe import DevCA
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    CONTAINMENT,
    TRIAGE,
    Identity,
    broker_config,
    live_accessors,
    vault_as,
)
from tests.integration.helpers import EVENT, issue_request, pem_pair, stub, svid


def _md(err: grpc.RpcError) -> dict[str, object]:
    return dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_minted_token_is_exactly_the_class_and_checked_by_vault(
    broker: BrokerServer, identity: Identity, bao: OpenBaoDev, vault_root: hvac.Client
) -> None:
    resp = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
        issue_request("enrichment", target="evil.example", initiating_event=EVENT,
                      justification="enrich", request_id="req-1"), timeout=10)
    cred = resp.credential
    assert resp.request_id == "req-1"
    assert resp.decision.outcome == pb.OUTCOME_ALLOW
    assert resp.decision.rule == "enrichment.workloads[0]"
    assert resp.decision.owner.team == "soc-platform"
    assert list(resp.decision.escalation) == ["soc-oncall"]
    assert resp.decision.scope_map_version.startswith("sha256:")

    info = vault_root.auth.token.lookup_accessor(cred.credential_id)["data"]
    assert info["policies"] == ["credbroker-enrichment"]  # exactly the class, no default
    assert 0 < info["ttl"] <= 120
    assert info["renewable"] is False
    assert info["meta"]["spiffe_id"] == TRIAGE
    assert info["meta"]["action_class"] == "enrichment"
    assert info["meta"]["request_id"] == "req-1"
    entity = vault_root.read(f"identity/entity/id/{info['entity_id']}")["data"]
    assert [a["name"] for a in entity["aliases"]] == [TRIAGE]

    agent = vault_as(bao, cred.token)
    assert agent.secrets.kv.v2.read_secret_version(
        path="soc/enrichment/ti", raise_on_deleted_version=False)["data"]["data"] == {"k": "v"}
    with pytest.raises(hvac.exceptions.Forbidden):
        agent.secrets.kv.v2.read_secret_version(path="soc/containment/edr",
                                                raise_on_deleted_version=False)
    with pytest.raises(hvac.exceptions.Forbidden):  # no default policy: not even renew-self
        agent.auth.token.renew_self()


def test_requested_ttl_is_honoured_and_capped(broker: BrokerServer, identity: Identity,
                                              vault_root: hvac.Client) -> None:
    s = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE))
    resp = s.IssueCredential(issue_request(ttl_seconds=30), timeout=10)
    assert resp.credential.ttl_seconds == 30
    assert vault_root.auth.token.lookup_accessor(resp.credential.credential_id)["data"]["ttl"] <= 30
    with pytest.raises(grpc.RpcError) as err:
        s.IssueCredential(issue_request(ttl_seconds=301), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_ttl" in err.value.details()


def test_unknown_action_class_is_invalid_argument_naming_it(
    broker: BrokerServer, identity: Identity, vault_root: hvac.Client
) -> None:
    before = live_accessors(vault_root)
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request("exfiltrate.everything"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'exfiltrate.everything'" in err.value.details()
    assert _md(err.value)[ERROR_CODE_MD_KEY] == "unknown_action_class"
    assert live_accessors(vault_root) == before


def test_class_not_allowed_is_permission_denied_naming_the_rule(
    broker: BrokerServer, identity: Identity, vault_root: hvac.Client
) -> None:
    before = live_accessors(vault_root)
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request("containment.isolate_host", target="h1", initiating_event=EVENT),
            timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "rule containment.isolate_host.workloads" in err.value.details()
    decision = pb.Decision.FromString(_md(err.value)[DECISION_MD_KEY])  # type: ignore[arg-type]
    assert decision.outcome == pb.OUTCOME_DENY
    assert decision.owner.team == "incident-response"
    assert decision.spiffe_id == TRIAGE
    assert live_accessors(vault_root) == before


def test_destructive_class_requires_an_initiating_event(broker: BrokerServer,
                                                        identity: Identity) -> None:
    s = stub(broker.port, identity.ca, svid(identity.ca, CONTAINMENT))
    with pytest.raises(grpc.RpcError) as err:
        s.IssueCredential(issue_request("containment.isolate_host", target="h1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requires initiating_event" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        s.IssueCredential(issue_request("enrichment", initiating_event=pb.InitiatingEvent(
            source="splunk")), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source and id" in err.value.details()
    ok = s.IssueCredential(issue_request("containment.isolate_host", target="h1",
                                         initiating_event=EVENT), timeout=10)
    assert list(ok.credential.policies) == ["credbroker-containment.isolate_host"]


def _material(ca_bundle: bytes, issued: object | None) -> PemMaterial | None:
    if issued is None:
        return PemMaterial(key=b"", chain=b"", bundle=ca_bundle, serial=0, spiffe_id="",
                           trust_domain="")
    key, cert = pem_pair(issued)  # type: ignore[arg-type]
    return PemMaterial(key=key, chain=cert, bundle=ca_bundle, serial=0, spiffe_id="",
                       trust_domain="")


@pytest.mark.parametrize("case", ["no client certificate", "another CA", "expired SVID"])
def test_bad_client_certificates_are_refused_in_the_handshake(
    case: str, broker: BrokerServer, identity: Identity, vault_root: hvac.Client
) -> None:
    now = datetime.now(UTC)
    client = {
        "no client certificate": None,
        "another CA": svid(DevCA("example.org", now=now), TRIAGE),
        "expired SVID": svid(identity.ca, TRIAGE, now=now - timedelta(hours=2),
                             ttl=timedelta(hours=1)),
    }[case]
    before = live_accessors(vault_root)
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, client).IssueCredential(issue_request(), timeout=10)
    # gRPC Python servers can only refuse such peers in the TLS handshake, before any
    # request byte is read; the client sees that as UNAVAILABLE, and diagnose_handshake
    # (used by the sidecar to answer 401) tells it apart from an outage.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    if client is not None:
        reason = diagnose_handshake(f"127.0.0.1:{broker.port}", DEFAULT_BROKER_DNS,
                                    _material(identity.ca.bundle_pem, client))
        assert reason is not None and "refused this workload's X.509-SVID" in reason
    assert live_accessors(vault_root) == before


def test_good_certificate_is_not_diagnosed_as_refused(broker: BrokerServer,
                                                      identity: Identity) -> None:
    material = _material(identity.ca.bundle_pem, svid(identity.ca, TRIAGE))
    assert diagnose_handshake(f"127.0.0.1:{broker.port}", DEFAULT_BROKER_DNS, material) is None
    assert diagnose_handshake("127.0.0.1:1", DEFAULT_BROKER_DNS, material) is None


def test_foreign_trust_domain_is_unauthenticated(broker: BrokerServer, identity: Identity,
                                                 vault_root: hvac.Client) -> None:
    before = live_accessors(vault_root)
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, svid(identity.ca, "spiffe://evil.example/agent/triage")
             ).IssueCredential(issue_request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "trust domain 'evil.example'" in err.value.details()
    assert live_accessors(vault_root) == before


def _jwt(identity: Identity, sub: str, aud: list[str], ttl: timedelta = timedelta(minutes=5)
         ) -> str:
    from broker.core.spiffeid import SpiffeId
    return identity.ca.issue_jwt(SpiffeId.parse(sub), aud, now=datetime.now(UTC), ttl=ttl)


@pytest.mark.parametrize(("sub", "aud", "ttl", "expect"), [
    (TRIAGE, ["other-service"], 300, "refused"),
    (TRIAGE, ["credbroker", "other-service"], 300, "exactly"),
    (CONTAINMENT, ["credbroker"], 300, "is not the mTLS peer"),
    (TRIAGE, ["credbroker"], -60, "refused"),
])
def test_bad_jwt_svids_are_unauthenticated(
    sub: str, aud: list[str], ttl: int, expect: str, broker: BrokerServer, identity: Identity
) -> None:
    token = _jwt(identity, sub, aud, timedelta(seconds=ttl))
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expect in err.value.details()
    assert token not in err.value.details()


def test_forged_and_malformed_bearer_tokens_are_unauthenticated(broker: BrokerServer,
                                                                identity: Identity) -> None:
    forged = _jwt(identity, TRIAGE, ["credbroker"])
    forged = forged[:-6] + ("AAAAAA" if not forged.endswith("AAAAAA") else "BBBBBB")
    s = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE))
    for value in (f"Bearer {forged}", "Bearer not-a-jwt", "Basic abc"):
        with pytest.raises(grpc.RpcError) as err:
            s.IssueCredential(issue_request(), metadata=[("authorization", value)], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_valid_jwt_svid_is_accepted(broker: BrokerServer, identity: Identity) -> None:
    token = _jwt(identity, TRIAGE, ["credbroker"])
    resp = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
        issue_request(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
    assert resp.credential.credential_id


def test_broker_requiring_jwt_refuses_mtls_only(bao: OpenBaoDev, identity: Identity,
                                                vault_root: hvac.Client) -> None:
    server = BrokerServer(broker_config(bao, identity, require_jwt_svid=True))
    server.start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
                issue_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "requires a JWT-SVID" in err.value.details()
    finally:
        server.stop(grace=0)


def test_hand_back_revokes_only_own_credentials(broker: BrokerServer, identity: Identity,
                                                bao: OpenBaoDev) -> None:
    triage = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE))
    other = stub(broker.port, identity.ca, svid(identity.ca, CONTAINMENT))
    cred = triage.IssueCredential(issue_request(), timeout=10).credential
    with pytest.raises(grpc.RpcError) as err:
        other.RevokeCredential(pb.RevokeCredentialRequest(credential_id=cred.credential_id),
                               timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert vault_as(bao, cred.token).secrets.kv.v2.read_secret_version(
        path="soc/enrichment/ti", raise_on_deleted_version=False)
    out = triage.RevokeCredential(pb.RevokeCredentialRequest(credential_id=cred.credential_id),
                                  timeout=10)
    assert not out.already_dead
    with pytest.raises(hvac.exceptions.Forbidden):
        vault_as(bao, cred.token).secrets.kv.v2.read_secret_version(
            path="soc/enrichment/ti", raise_on_deleted_version=False)
    again = triage.RevokeCredential(pb.RevokeCredentialRequest(credential_id=cred.credential_id),
                                    timeout=10)
    assert again.already_dead
    with pytest.raises(grpc.RpcError) as err:
        triage.RevokeCredential(pb.RevokeCredentialRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_vault_unreachable_is_unavailable_naming_vault(identity: Identity, short_tmp: Path
                                                       ) -> None:
    own = OpenBaoDev(short_tmp)
    own.start()
    server = BrokerServer(broker_config(own, identity))
    server.start()
    try:
        own.stop()
        with pytest.raises(grpc.RpcError) as err:
            stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
                issue_request(), timeout=15)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Vault at http://127.0.0.1:" in err.value.details()
        assert _md(err.value)[ERROR_CODE_MD_KEY] == "vault_unavailable"
    finally:
        server.stop(grace=0)


def test_no_token_or_key_in_logs_or_errors(broker: BrokerServer, identity: Identity,
                                           bao: OpenBaoDev, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    caplog.set_level(logging.DEBUG)
    client = svid(identity.ca, TRIAGE)
    s = stub(broker.port, identity.ca, client)
    cred = s.IssueCredential(issue_request(), timeout=10).credential
    with pytest.raises(grpc.RpcError) as err:
        s.IssueCredential(issue_request("containment.isolate_host", initiating_event=EVENT),
                          timeout=10)
    key_pem, _ = pem_pair(client)
    secrets = [cred.token, bao.root_token, key_pem.decode().splitlines()[1]]
    text = caplog.text + err.value.details()
    assert cred.credential_id in caplog.text  # the accessor is logged, which is the point
    for secret in secrets:
        assert secret not in text


def test_leaf_with_cert_signing_key_usage_is_unauthenticated(
    broker: BrokerServer, identity: Identity, vault_root: hvac.Client
) -> None:
    """X509-SVID spec 4.3 / 5.2: a leaf that may sign certificates is no client identity,
    even though it chains to the bundle and passes the TLS handshake."""
    from broker.core.spiffeid import SpiffeId
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    bad = identity.ca.issue_x509(SpiffeId.parse(TRIAGE), now=datetime.now(UTC),
                                 ttl=timedelta(minutes=10), key_usage=usage)
    before = live_accessors(vault_root)
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, bad).IssueCredential(issue_request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "keyCertSign or cRLSign" in err.value.details()
    assert "X509-SVID spec 4.3" in err.value.details()
    assert live_accessors(vault_root) == before


def test_a_megabyte_approval_id_from_a_workload_no_class_allows_costs_a_bounded_record(
    broker: BrokerServer, identity: Identity
) -> None:
    s = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE))
    audit = broker.config.audit_path
    before = audit.stat().st_size
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            s.IssueCredential(issue_request("containment.isolate_host", target="h1",
                                            initiating_event=EVENT,
                                            approval_id="a" * 1_000_000), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "approval_id" in err.value.details()
        assert len(err.value.details()) < 300  # the id is not echoed back
    grown = audit.stat().st_size - before
    # Refused before the decision: nothing, or at most a concurrent checkpoint, is written.
    assert grown < 4096, grown
    # A refusal by policy is audited, and even with every field at its limit it is small.
    before = audit.stat().st_size
    with pytest.raises(grpc.RpcError) as err:
        s.IssueCredential(issue_request(
            "containment.isolate_host", target="t" * 256, justification="j" * 2048,
            request_id="r" * 128, approval_id="a" * 128,
            initiating_event=pb.InitiatingEvent(source="s" * 128, id="i" * 256,
                                                summary="x" * 1024)), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert 0 < audit.stat().st_size - before < 16 * 1024


def test_a_line_break_in_request_id_never_reaches_the_broker_log(
    broker: BrokerServer, identity: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forged = "FORGED-LINE credbroker.broker request_id=x minted credential_id=y"
    s = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE))
    for request_id in (f"r1\n{forged}", f"r1\r\n{forged}", f"r1\x1b[2K{forged}"):
        with pytest.raises(grpc.RpcError) as err:
            s.IssueCredential(issue_request(request_id=request_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id must be 1 to 128 characters from A-Z a-z 0-9 . _ : -" \
            in err.value.details()
        # The refusal is logged and answered under a fresh id, never the one sent.
        md_id = str(_md(err.value)["credbroker-request-id"])
        assert md_id in caplog.text and "\n" not in md_id
    assert "FORGED-LINE" not in caplog.text
    with pytest.raises(grpc.RpcError) as err:
        stub(broker.port, identity.ca, svid(identity.ca, TRIAGE)).AwaitApproval(
            pb.AwaitApprovalRequest(approval_id=f"apr-1\n{forged}"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FORGED-LINE" not in caplog.text
