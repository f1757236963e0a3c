"""Scope-map rules at runtime through the real broker, and hot reload under a running broker."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import read_records
from broker.grpc.server import BrokerServer
from broker.wire.metadata import ERROR_CODE_MD_KEY
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    CONTAINMENT,
    TEST_MAP,
    TRIAGE,
    Identity,
    broker_config,
)
from tests.integration.helpers import EVENT, TcpProxy, issue_request, stub, svid


def _code(err: grpc.RpcError) -> object:
    return dict(err.trailing_metadata() or ()).get(ERROR_CODE_MD_KEY)  # type: ignore[attr-defined]


def test_targets_conditions_and_budgets_are_enforced(broker: BrokerServer, identity: Identity
                                                     ) -> None:
    s = stub(broker.port, identity.ca, svid(identity.ca, CONTAINMENT))

    def ask(target: str, justification: str) -> pb.IssueCredentialResponse:
        return s.IssueCredential(issue_request("identity.disable_account", target=target,
                                               justification=justification,
                                               initiating_event=EVENT), timeout=10)

    with pytest.raises(grpc.RpcError) as err:
        ask("admin", "disable the compromised account")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _code(err.value) == "target_not_allowed"
    with pytest.raises(grpc.RpcError) as err:
        ask("user-42", "short")
    assert _code(err.value) == "condition_false"
    ask("user-42", "disable the compromised account")
    ask("user-43", "disable the compromised account")
    with pytest.raises(grpc.RpcError) as err:
        ask("user-44", "disable the compromised account")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget of 2/h" in err.value.details()


def _replace(path: Path, text: str) -> None:
    """Swap the file's content in one rename, as a Kubernetes ConfigMap update does: an
    in-place write can be polled half-written (the broker then rejects that read and keeps
    its map, which is right, but the test would see the wrong rejection)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


def _until(check: Callable[[], bool], what: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_map_changes_under_a_running_broker(bao: OpenBaoDev, identity: Identity,
                                            short_tmp: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    caplog.set_level(logging.INFO)
    path = short_tmp / "live-map.yaml"
    shutil.copy(TEST_MAP, path)
    server = BrokerServer(broker_config(bao, identity, scope_map_path=path, reload_interval=0.1))
    server.start()
    try:
        s = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
        request = issue_request("containment.isolate_host", target="h", initiating_event=EVENT)
        with pytest.raises(grpc.RpcError) as err:
            s.IssueCredential(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert server.scope_maps is not None
        v1 = server.scope_maps.current.version

        # A good change takes effect for the next request.
        text = TEST_MAP.read_text().replace(
            "workloads: [spiffe://example.org/agent/containment]\n    credential:\n      ttl: 3m",
            f"workloads: [spiffe://example.org/agent/containment, {TRIAGE}]\n"
            "    credential:\n      ttl: 3m", 1)
        assert text != TEST_MAP.read_text()
        _replace(path, text)
        _until(lambda: server.scope_maps.current.version != v1,  # type: ignore[union-attr]
               "the broker did not pick up the new map")
        resp = s.IssueCredential(request, timeout=10)
        v2 = resp.decision.scope_map_version
        assert v2 != v1 and v2 == server.scope_maps.current.version

        # A malformed map changes nothing, and says so loudly.
        _replace(path, text.replace("risk: destructive", "risk: catastrophic"))
        _until(lambda: "REJECTED scope map reload" in caplog.text, "no rejection was logged")
        assert "catastrophic" in caplog.text
        assert server.scope_maps.current.version == v2
        assert s.IssueCredential(request, timeout=10).decision.scope_map_version == v2

        # An explicit reload (what SIGHUP does) of the same bad file is rejected again.
        assert server.reload() is False
        _replace(path, TEST_MAP.read_text())
        server.reload()  # the watcher may get there first; either way v1 is back in force
        _until(lambda: server.scope_maps.current.version == v1,  # type: ignore[union-attr]
               "the original map did not come back")
        with pytest.raises(grpc.RpcError):
            s.IssueCredential(request, timeout=10)
    finally:
        server.stop(grace=0)


def test_removing_a_class_ends_its_live_credentials(bao: OpenBaoDev, identity: Identity,
                                                    vault_root: hvac.Client,
                                                    short_tmp: Path) -> None:
    path = short_tmp / "removal-map.yaml"
    shutil.copy(TEST_MAP, path)
    server = BrokerServer(broker_config(bao, identity, scope_map_path=path, reload_interval=0))
    server.start()
    try:
        s = stub(server.port, identity.ca, svid(identity.ca, CONTAINMENT))
        cred = s.IssueCredential(issue_request("identity.disable_account", target="user-9",
                                               justification="disable the account",
                                               initiating_event=EVENT), timeout=10).credential
        kept = s.IssueCredential(issue_request(), timeout=10).credential
        text = TEST_MAP.read_text()
        start = text.index("  identity.disable_account:")
        _replace(path, text[:start] + text[text.index("  identity.revoke_tokens:"):])
        assert server.reload() is True
        # Powerless at once (its policy grants nothing), then revoked: ask OpenBao.
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=bao.addr, token=cred.token).secrets.kv.v2.read_secret_version(
                path="soc/identity/x", raise_on_deleted_version=False)
        _until(lambda: _dead(vault_root, cred.credential_id), "the removed class's token lives")
        assert not _dead(vault_root, kept.credential_id)  # other classes are untouched
        records = list(read_records(server.config.audit_path))
        removed = [r for r in records if r["type"] == "scope_map.class_removed"]
        assert [(r["action_class"], r["credentials_matched"], r["vault_policy_emptied"])
                for r in removed] == [("identity.disable_account", 1, True)]
        _until(lambda: any(r["type"] == "credentials.revoked"
                           and cred.credential_id in r.get("credential_ids", [])
                           for r in read_records(server.config.audit_path)),
               "the revocation is not on the record")
        # Later passes (the reconcile loop's) do not end the same class and credential again.
        assert server.scope_maps is not None and server.responder is not None
        assert server.responder.end_removed_classes(server.scope_maps.current) == []
        assert sum(r["type"] == "scope_map.class_removed"
                   for r in read_records(server.config.audit_path)) == 1
    finally:
        _replace(path, TEST_MAP.read_text())
        server.reload()  # the class and its real policy come back for the other tests
        server.stop(grace=0)


def _dead(vault_root: hvac.Client, accessor: str) -> bool:
    try:
        vault_root.auth.token.lookup_accessor(accessor)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return True
    return False


def test_the_broker_starts_without_vault_and_opens_issuance_once_vault_answers(
        bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client) -> None:
    proxy = TcpProxy(bao.port)
    proxy.cut()  # Vault unreachable from the start
    server = BrokerServer(broker_config(bao, identity, vault_addr=proxy.addr,
                                        health_interval=0.2))
    server.start()  # used to abort: "Vault ... is unreachable"
    try:
        s = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
        with pytest.raises(grpc.RpcError) as err:
            s.IssueCredential(issue_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _code(err.value) == "vault_unavailable"
        assert "not yet brought Vault in line" in err.value.details()
        assert server.health is not None
        assert any("Vault policies" in p for p in server.health.problems)
        proxy.restore()
        _until(lambda: server.scope_maps is not None and server.scope_maps.vault_synced,
               "the scope map never reached Vault")
        cred = s.IssueCredential(issue_request(), timeout=10).credential
        assert vault_root.auth.token.lookup_accessor(cred.credential_id)["data"]["meta"][
            "spiffe_id"] == TRIAGE
        assert any(r["type"] == "scope_map.loaded" for r in read_records(server.config.audit_path))
    finally:
        server.stop(grace=0)
        proxy.cut()
