"""Drift correction against a real OpenBao: what is changed behind the broker's back is put back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import hvac
import pytest

from broker.adapters.audit import read_records
from broker.adapters.vault import FROZEN_POLICY
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import ADMIN, Identity, broker_config

ENRICH = "credbroker-enrichment"


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _policy(vault_root: hvac.Client, name: str) -> str:
    rules: str = vault_root.sys.read_policy(name)["data"]["rules"]
    return rules


def _drift_records(server: BrokerServer) -> list[dict[str, object]]:
    # Read from disk: what an auditor would see.
    return [r for r in read_records(server.config.audit_path)
            if r["type"] == "vault.drift_corrected"]


def test_drift_is_corrected_recorded_and_never_thaws_a_freeze(
        own: OpenBaoDev, root: hvac.Client, identity: Identity,
        caplog: pytest.LogCaptureFixture) -> None:
    # Its own OpenBao: "a check writes nothing" holds only while this broker is the one
    # writer. On the session's OpenBao another broker (another map) corrects the same roles.
    bao, vault_root = own, root
    server = BrokerServer(broker_config(bao, identity, vault_drift_interval=0.3))
    server.start()
    assert server.scope_maps is not None and server.responder is not None
    assert server._vault is not None
    scope_map = server.scope_maps.current
    real = scope_map.classes["enrichment"].vault_policy_hcl()
    caplog.set_level(logging.ERROR, logger="credbroker.broker")
    try:
        # 1. A root token widens a managed policy and loosens its token role.
        vault_root.sys.create_or_update_policy(ENRICH, 'path "*" {capabilities=["read"]}')
        vault_root.write(f"auth/token/roles/{ENRICH}", allowed_policies=[ENRICH, "default"],
                         renewable=True, allowed_policies_glob=["*"], token_period=3600)
        _until(lambda: _policy(vault_root, ENRICH) == real, "the policy was not restored")
        _until(lambda: vault_root.read(f"auth/token/roles/{ENRICH}")["data"]["renewable"]
               is False, "the token role was not restored")
        role = vault_root.read(f"auth/token/roles/{ENRICH}")["data"]
        assert role["allowed_policies"] == [ENRICH]
        assert not role["allowed_policies_glob"] and role["token_period"] == 0

        def recorded(field: str) -> bool:  # the record follows the rewrite: wait for it
            return any(ENRICH in r[field] for r in _drift_records(server))  # type: ignore[operator]

        _until(lambda: recorded("policies") and recorded("token_roles"),
               "no vault.drift_corrected record names the policy and the role")
        assert bao.root_token not in server.config.audit_path.read_text()
        assert any(r.levelname == "ERROR" and "Vault DRIFT corrected" in r.getMessage()
                   for r in caplog.records)
        registry = server.metrics.registry
        assert (registry.get_sample_value("credbroker_vault_drift_corrected_total",
                                          {"kind": "policy"}) or 0) >= 1
        assert (registry.get_sample_value("credbroker_vault_drift_corrected_total",
                                          {"kind": "token_role"}) or 0) >= 1

        # 2. In line: a check writes nothing and records nothing.
        before = len(_drift_records(server))
        report = server.check_vault_drift()
        assert report is not None and not report.policies_written and not report.roles_written
        assert len(_drift_records(server)) == before

        # 3. A frozen class stays frozen: thawing its policy by hand is drift, undone.
        server.responder.freeze(spiffe_id="", action_class="enrichment", reason="drill", by=ADMIN)
        assert _policy(vault_root, ENRICH) == FROZEN_POLICY
        vault_root.sys.create_or_update_policy(ENRICH, real)
        _until(lambda: _policy(vault_root, ENRICH) == FROZEN_POLICY, "the freeze was thawed")
        server.responder.unfreeze(spiffe_id="", action_class="enrichment", reason="drill over",
                                  by=ADMIN)
        assert _policy(vault_root, ENRICH) == real

        # 4. A class frozen in Vault by someone else (another replica) is left frozen.
        other = "credbroker-containment.isolate_host"
        vault_root.sys.create_or_update_policy(other, FROZEN_POLICY)
        report = server.check_vault_drift()
        assert report is not None and report.kept_frozen == ("containment.isolate_host",)
        assert _policy(vault_root, other) == FROZEN_POLICY
    finally:
        server.stop(grace=0)


def test_an_identity_role_deleted_behind_the_brokers_back_is_written_again(
        broker: BrokerServer, identity: Identity, vault_root: hvac.Client) -> None:
    """Another broker's sync or an operator removed the role this process had written:
    the next mint writes it again instead of failing the agent's request."""
    from broker.adapters.vault import identity_role_name
    from tests.integration.conftest import TRIAGE
    from tests.integration.helpers import issue_request, stub, svid

    s = stub(broker.port, identity.ca, svid(identity.ca, TRIAGE))
    s.IssueCredential(issue_request(), timeout=10)
    assert broker.scope_maps is not None
    cls = broker.scope_maps.current.classes["enrichment"]
    role = identity_role_name(cls, TRIAGE)
    vault_root.delete(f"auth/token/roles/{role}")
    cred = s.IssueCredential(issue_request(), timeout=10).credential
    assert vault_root.auth.token.lookup_accessor(cred.credential_id)["data"]["meta"][
        "spiffe_id"] == TRIAGE
    assert vault_root.read(f"auth/token/roles/{role}") is not None
