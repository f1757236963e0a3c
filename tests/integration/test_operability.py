"""Health, metrics, reflection and configuration as an operator sees them."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import DevStackError, OpenBaoDev, free_port
from tests.integration.conftest import CONTAINMENT, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, issue_request, stub, svid


def _status(port: int) -> int:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="credbroker.v1.CredentialBroker"), timeout=5)
        return int(resp.status)
    finally:
        channel.close()


def _until(check: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_health_follows_vault_and_metrics_count(identity: Identity, short_tmp: Path) -> None:
    port = free_port()
    own = OpenBaoDev(short_tmp, port=port)
    own.start()
    metrics_port = free_port()
    server = BrokerServer(broker_config(own, identity, health_interval=0.2,
                                        metrics_listen=f"127.0.0.1:{metrics_port}",
                                        health_listen="127.0.0.1:0"))
    server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        assert _status(server.health_port) == serving
        stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request(), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
                issue_request("containment.isolate_host", initiating_event=EVENT), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub(server.port, identity.ca, svid(identity.ca, CONTAINMENT)).IssueCredential(
                issue_request("no.such.class"), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=5).read().decode()
        assert 'credbroker_issuance_total{action_class="enrichment",outcome="allow"} 1.0' in text
        assert ('credbroker_issuance_total{action_class="containment.isolate_host",'
                'outcome="deny"} 1.0') in text
        assert 'action_class="(unknown)",outcome="deny"} 1.0' in text
        assert "credbroker_issuance_seconds_bucket" in text
        _until(lambda: "credbroker_live_credentials 1.0" in urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode(),
            "live credentials gauge")

        own.stop()  # OpenBao goes away ...
        _until(lambda: _status(server.health_port) != serving, "still SERVING without Vault")
        assert any("Vault" in p for p in server.health.problems)  # type: ignore[union-attr]
        token = own.root_token
        for attempt in range(3):  # ... and comes back (same broker token, same port;
            own = OpenBaoDev(short_tmp, port=port)  # the port may take a moment to free)
            own.root_token = token
            try:
                own.start()
                break
            except DevStackError:
                if attempt == 2:
                    raise
                time.sleep(1.0)
        _until(lambda: _status(server.health_port) == serving, "not SERVING after Vault returned")
    finally:
        server.stop(grace=0)
        own.stop()


def test_reflection_lists_the_services(broker: BrokerServer, identity: Identity) -> None:
    from broker.options import DEFAULT_BROKER_DNS
    from tests.integration.helpers import pem_pair

    key, cert = pem_pair(svid(identity.ca, TRIAGE))
    creds = grpc.ssl_channel_credentials(root_certificates=identity.ca.bundle_pem,
                                         private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(f"127.0.0.1:{broker.port}", creds, options=[
        ("grpc.ssl_target_name_override", DEFAULT_BROKER_DNS)])
    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"credbroker.v1.CredentialBroker", "credbroker.v1.CredentialAdmin",
            "credbroker.v1.Approvals", "grpc.health.v1.Health"} <= names
    channel.close()


def test_config_file_with_flags_winning(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from broker.cli.main import main

    bad = tmp_path / "broker.yaml"
    bad.write_text("listen: 127.0.0.1:1\ncolour: red\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "unknown key(s) colour" in capsys.readouterr().err
