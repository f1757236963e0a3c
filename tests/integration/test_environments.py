"""Production and sandbox, each its own real OpenBao, behind one broker.

Every assertion about a credential asks the OpenBao it belongs to (or the other one):
whether the token works, whether its accessor is alive, what a policy holds.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import hvac
import hvac.exceptions
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.approvers import ApproverConfig, DevIssuer
from broker.adapters.audit import read_records
from broker.adapters.environments import EnvironmentConfig
from broker.adapters.registry import SqliteStore
from broker.adapters.vault import FROZEN_POLICY
from broker.core.audittrace import to_ocsf, trace, trace_lines
from broker.core.spiffeid import SpiffeId
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    TRIAGE,
    Identity,
    broker_config,
    root_client,
    start_sidecar,
)
from tests.integration.helpers import EVENT, admin_stub, approvals_stub, stub, svid

MAP = Path(__file__).parent.parent / "data" / "environments-map.yaml"


def _bao(short_tmp: Path, name: str) -> Iterator[OpenBaoDev]:
    server = OpenBaoDev(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=short_tmp)))
    server.start()
    root = hvac.Client(url=server.addr, token=server.root_token)
    for path in ("soc/containment/edr", "soc/enrichment/ti"):
        root.secrets.kv.v2.create_or_update_secret(path=path, secret={"env": name})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def production(short_tmp: Path) -> Iterator[OpenBaoDev]:
    yield from _bao(short_tmp, "production")


@pytest.fixture(scope="module")
def sandbox(short_tmp: Path) -> Iterator[OpenBaoDev]:
    yield from _bao(short_tmp, "sandbox")


@dataclass
class World:
    server: BrokerServer
    identity: Identity
    idp: DevIssuer
    production: OpenBaoDev
    sandbox: OpenBaoDev

    def issue(self, who: str, cls: str, environment: str = "",
              **kw: object) -> pb.IssueCredentialResponse:
        req = pb.IssueCredentialRequest(action_class=cls, target="ws-7", environment=environment,
                                        initiating_event=EVENT, justification="drill",
                                        **kw)  # type: ignore[arg-type]
        return stub(self.server.port, self.identity.ca,  # type: ignore[no-any-return]
                    svid(self.identity.ca, who)).IssueCredential(req, timeout=20)

    def admin(self) -> object:
        return admin_stub(self.server.port, self.identity.ca, svid(self.identity.ca, ADMIN))

    def records(self, kind: str) -> list[dict[str, object]]:
        return [r for r in read_records(self.server.config.audit_path) if r["type"] == kind]


@pytest.fixture(scope="module")
def world(production: OpenBaoDev, sandbox: OpenBaoDev, identity: Identity,
          short_tmp: Path) -> Iterator[World]:
    d = Path(tempfile.mkdtemp(prefix="envs-", dir=short_tmp))
    idp = DevIssuer(d)
    cfg = broker_config(
        production, identity, scope_map_path=MAP, default_environment="production",
        environments=(EnvironmentConfig(name="sandbox", addr=sandbox.addr,
                                        token=sandbox.root_token),),
        approvers=ApproverConfig(issuer=DevIssuer.ISSUER, jwks_path=idp.jwks_path))
    server = BrokerServer(cfg)
    server.start()
    yield World(server=server, identity=identity, idp=idp, production=production,
                sandbox=sandbox)
    server.stop(grace=0)


def reads(bao: OpenBaoDev, token: str, path: str = "soc/containment/edr") -> bool:
    """Does ``bao`` let ``token`` read ``path``? (OpenBao's own answer.)"""
    try:
        hvac.Client(url=bao.addr, token=token).secrets.kv.v2.read_secret_version(
            path=path, raise_on_deleted_version=False)
        return True
    except hvac.exceptions.Forbidden:
        return False


def policy(bao: OpenBaoDev, name: str) -> str | None:
    try:
        return str(root_client(bao).sys.read_policy(name)["data"]["rules"])
    except hvac.exceptions.InvalidPath:
        return None


def alive(bao: OpenBaoDev, accessor: str) -> bool:
    try:
        root_client(bao).auth.token.lookup_accessor(accessor)
        return True
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return False


def test_isolation_is_free_in_the_sandbox_and_its_token_is_refused_by_production(
        world: World) -> None:
    resp = world.issue(CONTAINMENT, "containment.isolate_host", "sandbox")
    cred = resp.credential
    assert cred.environment == "sandbox" and resp.decision.outcome == pb.OUTCOME_ALLOW
    assert "allowed in environment 'sandbox' without approval" in resp.decision.reasons[0]
    assert reads(world.sandbox, cred.token)
    assert alive(world.sandbox, cred.credential_id)
    # the sandbox token means nothing to production's OpenBao
    assert not reads(world.production, cred.token)
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=world.production.addr, token=cred.token).auth.token.lookup_self()
    assert not alive(world.production, cred.credential_id)
    minted = [r for r in world.records("credential.minted")
              if r["credential_id"] == cred.credential_id]
    assert minted and minted[0]["environment"] == "sandbox"
    decision = [r for r in world.records("decision") if r["request_id"] == resp.request_id]
    assert decision[0]["environment"] == "sandbox"
    assert decision[0]["request"]["environment"] == "sandbox"  # type: ignore[index]
    row = SqliteStore(world.server.config.registry_path).get(cred.credential_id)
    assert row is not None and row.environment == "sandbox"
    listed = world.admin().ListCredentials(  # type: ignore[attr-defined]
        pb.Selector(spiffe_id=CONTAINMENT), timeout=10).credentials
    assert {c.credential_id: c.environment for c in listed}[cred.credential_id] == "sandbox"


def test_isolation_in_production_is_minted_in_productions_vault_once_approved(
        world: World) -> None:
    pending = world.issue(CONTAINMENT, "containment.isolate_host", "production")
    assert pending.decision.outcome == pb.OUTCOME_NEEDS_APPROVAL
    assert pending.decision.rule == "containment.isolate_host.environments.production"
    assert not pending.HasField("credential")
    assert pending.approval.request.environment == "production"
    approvals = approvals_stub(world.server.port, world.identity.ca,
                               svid(world.identity.ca, ADMIN, ttl=timedelta(hours=1)))
    approvals.Approve(pb.ApprovalDecisionRequest(
        approval_id=pending.approval.id, reason="confirmed C2",
        id_token=world.idp.id_token("alice@example.org")), timeout=10)
    got = stub(world.server.port, world.identity.ca, svid(world.identity.ca, CONTAINMENT)
               ).AwaitApproval(pb.AwaitApprovalRequest(approval_id=pending.approval.id,
                                                       wait_seconds=10), timeout=20)
    cred = got.credential
    assert cred.environment == "production"
    assert reads(world.production, cred.token) and alive(world.production, cred.credential_id)
    assert not reads(world.sandbox, cred.token)
    # the approval was for production: it releases nothing in the sandbox
    with pytest.raises(grpc.RpcError) as err:
        world.issue(CONTAINMENT, "containment.isolate_host", "sandbox",
                    approval_id=pending.approval.id)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_request_naming_no_environment_goes_to_the_default_one(world: World) -> None:
    resp = world.issue(CONTAINMENT, "containment.isolate_host")
    assert resp.decision.outcome == pb.OUTCOME_NEEDS_APPROVAL
    assert resp.approval.request.environment == "production"
    plain = world.issue(TRIAGE, "ticket.comment")  # no environments block: allowed anywhere
    assert plain.credential.environment == "production"
    assert reads(world.production, plain.credential.token, "soc/enrichment/ti")


def test_a_class_denied_in_an_environment_is_refused_and_not_in_its_vault(
        world: World) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.issue(TRIAGE, "enrichment", "production")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers["credbroker-error-code"] == "environment_not_allowed"
    assert "enrichment is denied in environment 'production'" in err.value.details()
    decision = world.records("decision")[-1]
    assert decision["decision"]["rule"] == "enrichment.environments.production"  # type: ignore[index]
    # production's OpenBao holds no policy or role for the class; the sandbox's does
    assert policy(world.production, "credbroker-enrichment") is None
    assert root_client(world.production).read("auth/token/roles/credbroker-enrichment") is None
    assert "secret/data/soc/enrichment/*" in str(policy(world.sandbox, "credbroker-enrichment"))
    assert world.issue(TRIAGE, "enrichment", "sandbox").credential.environment == "sandbox"


def test_an_unknown_environment_is_a_clear_400(world: World) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.issue(TRIAGE, "enrichment", "staging")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata() or ())["credbroker-error-code"] == \
        "unknown_environment"
    assert "environment 'staging' is not one this broker declares (known: production, " \
           "sandbox)" in err.value.details()


def test_a_hand_back_revokes_in_the_vault_that_minted_it(world: World) -> None:
    cred = world.issue(TRIAGE, "enrichment", "sandbox").credential
    assert alive(world.sandbox, cred.credential_id)
    stub(world.server.port, world.identity.ca, svid(world.identity.ca, TRIAGE)
         ).RevokeCredential(pb.RevokeCredentialRequest(credential_id=cred.credential_id,
                                                       reason="done"), timeout=10)
    assert not alive(world.sandbox, cred.credential_id)
    assert not reads(world.sandbox, cred.token, "soc/enrichment/ti")
    revoked = [r for r in world.records("credential.revoked")
               if r["credential_id"] == cred.credential_id]
    assert revoked[0]["environment"] == "sandbox" and revoked[0]["result"] == "revoked"


def test_a_revoke_by_environment_ends_only_that_environments_credentials(
        world: World) -> None:
    """``credbroker revoke --environment sandbox``: OpenBao says which tokens died."""
    sand = world.issue(TRIAGE, "ticket.comment", "sandbox").credential
    prod = world.issue(TRIAGE, "ticket.comment", "production").credential
    admin = world.admin()
    listed = admin.ListCredentials(pb.Selector(environment="sandbox"),  # type: ignore[attr-defined]
                                   timeout=10)
    ids = {c.credential_id for c in listed.credentials}
    assert sand.credential_id in ids and prod.credential_id not in ids
    for _ in admin.RevokeCredentials(pb.RevokeCredentialsRequest(  # type: ignore[attr-defined]
            selector=pb.Selector(environment="sandbox"), reason="sandbox reset"), timeout=30):
        pass
    assert not alive(world.sandbox, sand.credential_id)
    assert alive(world.production, prod.credential_id)
    with pytest.raises(grpc.RpcError) as err:
        admin.ListCredentials(pb.Selector(environment="staging"),  # type: ignore[attr-defined]
                              timeout=10)
    assert "staging" in (err.value.details() or "") and "sandbox" in (err.value.details() or "")


def test_a_freeze_reaches_every_environments_vault(world: World) -> None:
    prod = world.issue(TRIAGE, "ticket.comment", "production").credential
    sand = world.issue(TRIAGE, "ticket.comment", "sandbox").credential
    assert reads(world.production, prod.token, "soc/enrichment/ti")
    assert reads(world.sandbox, sand.token, "soc/enrichment/ti")
    admin = world.admin()
    resp = admin.Freeze(pb.FreezeRequest(spiffe_id=TRIAGE, reason="drill"),  # type: ignore[attr-defined]
                        timeout=30)
    try:
        assert not resp.vault_pending and resp.vault_entities_disabled == 2
        # each OpenBao refuses its own token at once (the identity's entity is disabled)
        assert not reads(world.production, prod.token, "soc/enrichment/ti")
        assert not reads(world.sandbox, sand.token, "soc/enrichment/ti")
        assert world.server.responder is not None
        thread = world.server.responder.last_freeze_revocation
        assert thread is not None
        thread.join(30)
        assert not alive(world.production, prod.credential_id)
        assert not alive(world.sandbox, sand.credential_id)
        bulk = [r for r in world.records("credentials.revoked")
                if r.get("selector") == f"freeze {resp.freeze.id}"]
        envs = bulk[-1]["environments"]
        assert isinstance(envs, dict)
        assert (envs[prod.credential_id], envs[sand.credential_id]) == ("production", "sandbox")
    finally:
        admin.Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="drill over"),  # type: ignore[attr-defined]
                       timeout=30)
    again = world.issue(TRIAGE, "ticket.comment", "sandbox").credential
    assert reads(world.sandbox, again.token, "soc/enrichment/ti")  # entity enabled again


def test_a_class_freeze_empties_its_policy_in_every_vault(world: World) -> None:
    admin = world.admin()
    admin.Freeze(pb.FreezeRequest(action_class="containment.isolate_host",  # type: ignore[attr-defined]
                                  reason="drill"), timeout=30)
    try:
        for bao in (world.production, world.sandbox):
            assert policy(bao, "credbroker-containment.isolate_host") == FROZEN_POLICY
    finally:
        admin.Unfreeze(pb.UnfreezeRequest(action_class="containment.isolate_host",  # type: ignore[attr-defined]
                                          reason="drill over"), timeout=30)
    for bao in (world.production, world.sandbox):
        assert "secret/data/soc/containment/*" in str(
            policy(bao, "credbroker-containment.isolate_host"))


def test_trace_and_export_show_the_environment(world: World) -> None:
    resp = world.issue(TRIAGE, "enrichment", "sandbox")
    records = list(read_records(world.server.config.audit_path))
    t = trace(records, resp.credential.credential_id)
    assert t is not None
    text = "\n".join(trace_lines(t, datetime.now(UTC)))
    assert "3. action class: enrichment on target ws-7 in environment sandbox" in text
    assert f"6. credential {resp.credential.credential_id} minted in environment sandbox's " \
           "Vault" in text
    minted = next(r for r in records if r["type"] == "credential.minted"
                  and r["credential_id"] == resp.credential.credential_id)
    event = to_ocsf(minted)
    assert event["metadata"]["labels"] == ["environment:sandbox"]
    assert "minted in sandbox for" in event["message"]


def test_the_sidecar_passes_the_environment_and_answers_an_unknown_one(
        world: World, short_tmp: Path) -> None:
    sc = start_sidecar(world.identity, "triage", f"127.0.0.1:{world.server.port}",
                       Path(tempfile.mkdtemp(prefix="sc-", dir=short_tmp)) / "s.sock")
    try:
        body = {"action_class": "enrichment", "target": "ws-7", "environment": "sandbox"}
        status, cred = sc.client.raw("POST", "/v1/credentials", body)
        assert status == 200 and cred["environment"] == "sandbox", cred
        assert reads(world.sandbox, cred["token"], "soc/enrichment/ti")
        assert not reads(world.production, cred["token"], "soc/enrichment/ti")
        status, again = sc.client.raw("POST", "/v1/credentials", body)  # from the cache
        assert again["credential_id"] == cred["credential_id"]
        status, prod = sc.client.raw("POST", "/v1/credentials",
                                     {**body, "environment": "production"})
        assert status == 403 and prod["error"]["code"] == "environment_not_allowed"
        status, err = sc.client.raw("POST", "/v1/credentials", {**body, "environment": "qa"})
        assert status == 400 and err["error"]["code"] == "unknown_environment"
        assert "known: production, sandbox" in err["error"]["message"]
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def test_reconcile_revokes_an_orphan_in_the_vault_that_holds_it(world: World) -> None:
    """A mint whose answer was lost in the sandbox: the token is found there and revoked."""
    responder = world.server.responder
    assert responder is not None
    store = responder.store
    cls = world.server.scope_maps.current.classes["enrichment"]  # type: ignore[union-attr]
    now = datetime.now(UTC)
    store.record_intent(request_id="lost-sandbox-mint", spiffe_id=TRIAGE,
                        action_class="enrichment", target="", event_source="", event_id="",
                        at=now, environment="sandbox")
    store.mark_ambiguous("lost-sandbox-mint")
    minted = responder.vaults.vault("sandbox").mint(
        cls=cls, spiffe_id=SpiffeId.parse(TRIAGE), ttl_seconds=60, now=now,
        metadata={"request_id": "lost-sandbox-mint", "broker_instance": store.instance_id})
    assert alive(world.sandbox, minted.accessor)
    report = responder.reconcile()
    assert report.revoked == 1, report
    assert not alive(world.sandbox, minted.accessor)
    revoked = [r for r in world.records("credential.revoked")
               if r["credential_id"] == minted.accessor]
    assert revoked[0]["environment"] == "sandbox" and revoked[0]["selector"] == "reconcile"


def test_vault_sync_writes_each_vault_the_classes_allowed_there(
        world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.cli.main import main

    monkeypatch.setenv("VAULT_ADDR", world.production.addr)
    monkeypatch.setenv("VAULT_TOKEN", world.production.root_token)
    monkeypatch.setenv("SANDBOX_TOKEN", world.sandbox.root_token)
    base = ["vault", "sync", "--scope-map", str(MAP), "--json"]
    assert main(base) == 2  # the map declares environments this command was not given
    assert "declares environment(s) production, sandbox" in capsys.readouterr().err
    assert main([*base, "--default-environment", "production", "--environment",
                 f"sandbox={world.sandbox.addr},token-env=SANDBOX_TOKEN"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert "sandbox:credbroker-enrichment" in report["unchanged"]
    assert not any(n.startswith("production:credbroker-enrichment")
                   for k in ("unchanged", "policies_written") for n in report[k])
    assert world.sandbox.root_token not in out


def test_health_names_the_environment_whose_vault_is_down(world: World) -> None:
    assert world.server.health is not None
    assert world.server.health.check_now(), world.server.health.problems
    world.sandbox.stop()
    assert not world.server.health.check_now()
    assert any(p.startswith("Vault (sandbox): ") for p in world.server.health.problems)
    assert not any(p.startswith("Vault (production)") for p in world.server.health.problems)
    with pytest.raises(grpc.RpcError) as err:  # production still mints
        world.issue(TRIAGE, "enrichment", "sandbox")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert world.issue(TRIAGE, "ticket.comment", "production").credential.token


def test_one_environments_vault_down_does_not_stop_freeze_or_reconcile_in_the_others(
        world: World) -> None:
    """The sandbox OpenBao is down (the test above stopped it): a freeze is still enforced
    at once by production's OpenBao, and reconcile still revokes production's orphans and
    keeps the sandbox intent it could not check."""
    world.sandbox.stop()  # (already stopped when the module runs in order)
    assert not world.server.health.check_now()  # type: ignore[union-attr]
    responder = world.server.responder
    assert responder is not None
    prod = world.issue(TRIAGE, "ticket.comment", "production").credential
    assert reads(world.production, prod.token, "soc/enrichment/ti")
    # A lost mint in production, and one in the (unreachable) sandbox.
    store, now = responder.store, datetime.now(UTC)
    cls = world.server.scope_maps.current.classes["ticket.comment"]  # type: ignore[union-attr]
    for rid, env in (("lost-prod", "production"), ("lost-sand", "sandbox")):
        store.record_intent(request_id=rid, spiffe_id=TRIAGE, action_class=cls.name,
                            target="", event_source="", event_id="", at=now, environment=env)
        store.mark_ambiguous(rid)
    orphan = responder.vaults.vault("production").mint(
        cls=cls, spiffe_id=SpiffeId.parse(TRIAGE), ttl_seconds=60, now=now,
        metadata={"request_id": "lost-prod", "broker_instance": store.instance_id})
    report = responder.reconcile()
    assert report.revoked == 1 and "Vault (sandbox)" in report.error, report
    assert not alive(world.production, orphan.accessor)
    left = {i.request_id: i.environment for i in store.intents()}
    assert "lost-prod" not in left and left["lost-sand"] == "sandbox"  # not "no token"
    assert set(left.values()) == {"sandbox"}
    admin = world.admin()
    resp = admin.Freeze(pb.FreezeRequest(spiffe_id=TRIAGE,  # type: ignore[attr-defined]
                                         reason="drill with sandbox down"), timeout=30)
    assert resp.vault_pending and "Vault (sandbox)" in resp.vault_error
    assert not reads(world.production, prod.token, "soc/enrichment/ti")  # at once
    # Unfreezing needs every Vault to give the power back: with one down it stays frozen.
    with pytest.raises(grpc.RpcError) as err:
        admin.Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE,  # type: ignore[attr-defined]
                                          reason="drill over"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
