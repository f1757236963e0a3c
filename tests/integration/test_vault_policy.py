"""The least-privilege Vault policy shipped for the broker is enough for everything it does."""

from __future__ import annotations

from pathlib import Path

import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import read_records
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import ADMIN, CONTAINMENT, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, admin_stub, issue_request, stub, svid

POLICY = Path(__file__).parents[2] / "k8s" / "overlays" / "production" / "vault-policy.hcl"


def test_broker_runs_on_the_shipped_policy(bao: OpenBaoDev, identity: Identity,
                                           vault_root: hvac.Client, short_tmp: Path) -> None:
    vault_root.sys.create_or_update_policy("credbroker-broker-test", POLICY.read_text())
    token = vault_root.auth.token.create(policies=["credbroker-broker-test"], ttl="1h",
                                         no_default_policy=True)["auth"]["client_token"]
    cfg = broker_config(bao, identity, vault_token=token)
    server = BrokerServer(cfg)
    server.start()  # syncs policies and roles with this token
    try:
        cred = stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request(), timeout=10).credential
        stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).RevokeCredential(
            pb.RevokeCredentialRequest(credential_id=cred.credential_id), timeout=10)
        mint = stub(server.port, identity.ca, svid(identity.ca, CONTAINMENT)).IssueCredential(
            issue_request("containment.isolate_host", target="h", initiating_event=EVENT),
            timeout=10).credential
        admin = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN))
        resp = admin.Freeze(pb.FreezeRequest(spiffe_id=CONTAINMENT, reason="policy test"),
                            timeout=30)
        assert resp.vault_entities_disabled == 1
        assert server.responder is not None and server.responder.last_freeze_revocation
        server.responder.last_freeze_revocation.join(30)  # revoke-prefix, on this policy
        revoked = [r for r in read_records(cfg.audit_path) if r["type"] == "credentials.revoked"
                   and r.get("vault_revoke_prefixes")]
        assert revoked and revoked[-1]["credential_ids"] == [mint.credential_id]
        assert revoked[-1]["counts"]["revoked"] == 1
        with pytest.raises(hvac.exceptions.InvalidRequest):  # gone from Vault
            vault_root.auth.token.lookup_accessor(mint.credential_id)
        admin.Unfreeze(pb.UnfreezeRequest(spiffe_id=CONTAINMENT, reason="done"), timeout=30)
        admin.Freeze(pb.FreezeRequest(action_class="enrichment", reason="policy test"),
                     timeout=30)
        admin.Unfreeze(pb.UnfreezeRequest(action_class="enrichment", reason="done"), timeout=30)
        assert server.responder is not None
        assert server.responder.vault.managed_accessors(server.store.instance_id  # type: ignore[union-attr]
                                                        ) is not None  # list needs sudo
        with pytest.raises(hvac.exceptions.Forbidden):  # it cannot read secrets itself
            hvac.Client(url=bao.addr, token=token).secrets.kv.v2.read_secret_version(
                path="soc/enrichment/ti", raise_on_deleted_version=False)
        assert mint.credential_id
    finally:
        server.stop(grace=0)
