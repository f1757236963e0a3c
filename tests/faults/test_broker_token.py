"""The broker's own Vault token revoked under it: NOT_SERVING, and agents hear 503, not 500."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import hvac
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.faults.conftest import Factory
from tests.faults.support import BrokerFiles, VaultView, error_code, settle, until
from tests.integration.conftest import TRIAGE, Identity
from tests.integration.helpers import issue_request, stub, svid

POLICY = Path(__file__).parents[2] / "k8s" / "overlays" / "production" / "vault-policy.hcl"


def _health(port: int) -> int:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="credbroker.v1.CredentialBroker"),
            timeout=5).status)
    finally:
        channel.close()


def test_broker_token_revoked(
    vault_root: hvac.Client, make_broker: Factory, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles]
) -> None:
    vault_root.sys.create_or_update_policy("credbroker-broker-faults", POLICY.read_text())
    token = vault_root.auth.token.create_orphan(
        policies=["credbroker-broker-faults"], ttl="1h", no_default_policy=True,
    )["auth"]["client_token"]
    server = make_broker(vault_token=token, health_listen="127.0.0.1:0")
    assert server.health is not None
    agent = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(server.health_port) == serving, server.health.problems
    handed = [agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex),
                                    timeout=15).credential.credential_id]

    vault_root.auth.token.revoke(token)
    until(lambda: _health(server.health_port) != serving,
          "health to go NOT_SERVING once the broker's Vault token is revoked")
    problems = " ".join(server.health.problems)
    assert "Vault token" in problems and "revoked" in problems, problems

    with pytest.raises(grpc.RpcError) as err:
        agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex), timeout=15)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.code()
    assert error_code(err.value) == "vault_unavailable"
    assert "token" in err.value.details()
    assert server.store is not None
    assert server.store.intents() == []  # Vault refused: certainly nothing minted, no intent
    v = settle(view, tracked, handed)
    assert v.ok, str(v)
