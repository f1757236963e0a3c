"""A freeze while OpenBao is unreachable: in force for issuance at once, enforced by Vault
as soon as it is back."""

from __future__ import annotations

import uuid

import grpc
import hvac
import hvac.exceptions
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from credbroker_dev.devstack import OpenBaoDev
from tests.faults.conftest import Factory
from tests.faults.support import BrokerFiles, VaultView, audit_records, error_code, settle, until
from tests.integration.conftest import ADMIN, TRIAGE, Identity, vault_as
from tests.integration.helpers import TcpProxy, admin_stub, issue_request, stub, svid


def _reads_secret(bao: OpenBaoDev, token: str) -> bool:
    try:
        vault_as(bao, token).secrets.kv.v2.read_secret_version(
            path="soc/enrichment/ti", raise_on_deleted_version=False)
    except hvac.exceptions.Forbidden:
        return False
    return True


def _reenable(vault_root: hvac.Client, spiffe_id: str) -> None:
    """Give the shared OpenBao's entity back, whatever the test did (other tests use it)."""
    mounts = vault_root.sys.list_auth_methods()
    accessor = mounts.get("data", mounts)["token/"]["accessor"]
    resp = vault_root.write("identity/lookup/entity", alias_name=spiffe_id,
                            alias_mount_accessor=accessor)
    if resp and resp.get("data"):
        vault_root.write(f"identity/entity/id/{resp['data']['id']}", disabled=False)


def test_freeze_while_openbao_is_unreachable(
    bao: OpenBaoDev, vault_root: hvac.Client, make_broker: Factory, proxy: TcpProxy,
    view: VaultView, identity: Identity, tracked: list[BrokerFiles]
) -> None:
    server = make_broker(vault_addr=proxy.addr)
    agent = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
    admin = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN))
    old = agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex),
                                timeout=15).credential
    assert _reads_secret(bao, old.token)
    try:
        proxy.cut()
        resp = admin.Freeze(pb.FreezeRequest(spiffe_id=TRIAGE, reason="fault drill: partition"),
                            timeout=30)
        assert resp.vault_pending, "Vault was unreachable, yet the freeze says it is enforced"
        assert resp.vault_error and "unreachable" in resp.vault_error
        assert resp.credentials_matched == 1
        listed = admin.ListFreezes(pb.ListFreezesRequest(), timeout=10).freezes
        assert [f.id for f in listed if f.pattern == TRIAGE] == [resp.freeze.id]
        with pytest.raises(grpc.RpcError) as err:
            agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex), timeout=15)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_code(err.value) == "frozen"
        assert "fault drill" in err.value.details()
        # Vault never heard of it: the old token still works, until Vault is back.
        assert _reads_secret(bao, old.token)

        proxy.restore()
        until(lambda: not _reads_secret(bao, old.token),
              "OpenBao to refuse the frozen identity's token once reachable", timeout=15)
        assert server.config.audit_path is not None
        until(lambda: any(r["type"] == "freeze.enforced" and r.get("freeze_id") == resp.freeze.id
                          for r in audit_records(server.config.audit_path)),
              "the freeze.enforced audit record")
        # The pending revocation of the frozen identity's credential is done as well.
        until(lambda: not view.alive(old.credential_id), "the frozen credential revoked")
        with pytest.raises(grpc.RpcError) as err:  # still frozen for issuance
            agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex), timeout=15)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        v = settle(view, tracked, [old.credential_id])
        assert v.ok, str(v)
        admin.Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="drill over"), timeout=30)
        fresh = agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex),
                                      timeout=15).credential
        assert _reads_secret(bao, fresh.token)
    finally:
        proxy.restore()
        _reenable(vault_root, TRIAGE)
