"""An environment in an OpenBao namespace: ``--environment sandbox=URL,namespace=sandbox``.

One real dev OpenBao: production is its root namespace (the ``--vault-addr`` Vault),
sandbox its namespace ``sandbox``. Every assertion asks OpenBao itself, in the namespace
or at the root (hvac with ``namespace=``): which policies, roles and entities exist where,
whether an accessor is alive, whether a token reads a secret.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import hvac
import hvac.exceptions
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import read_records
from broker.adapters.environments import EnvironmentConfig
from broker.adapters.vault import VaultAdapter, identity_role_name
from broker.core.spiffeid import SpiffeId
from broker.errors import VaultUnavailableError
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import ADMIN, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, admin_stub, stub, svid

MAP = Path(__file__).parent.parent / "data" / "namespace-map.yaml"
NS = "sandbox"
ENRICH = "credbroker-enrichment"  # sandbox only
TICKET = "credbroker-ticket.comment"  # production only


def client(bao: OpenBaoDev, namespace: str = "", token: str = "") -> hvac.Client:
    """OpenBao as ``token`` (root's by default), at the root or in ``namespace``."""
    return hvac.Client(url=bao.addr, token=token or bao.root_token, namespace=namespace or None)


@pytest.fixture(scope="module")
def bao(short_tmp: Path) -> Iterator[OpenBaoDev]:
    """A dev OpenBao with namespace ``sandbox``; each place has its own KV ``secret/``
    holding ``soc/enrichment/ti`` and ``soc/tickets/t`` (``where``: root or sandbox)."""
    server = OpenBaoDev(Path(tempfile.mkdtemp(prefix="nsbao-", dir=short_tmp)))
    server.start()
    client(server).write(f"sys/namespaces/{NS}")
    client(server, NS).sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    for ns, where in (("", "root"), (NS, NS)):
        for path in ("soc/enrichment/ti", "soc/tickets/t"):
            client(server, ns).secrets.kv.v2.create_or_update_secret(
                path=path, secret={"where": where})
    yield server
    server.stop()


@dataclass
class World:
    server: BrokerServer
    identity: Identity
    bao: OpenBaoDev

    def issue(self, cls: str, environment: str) -> pb.Credential:
        req = pb.IssueCredentialRequest(action_class=cls, target="ws-7", environment=environment,
                                        initiating_event=EVENT, justification="drill")
        resp = stub(self.server.port, self.identity.ca, svid(self.identity.ca, TRIAGE)
                    ).IssueCredential(req, timeout=20)
        assert resp.credential.environment == environment
        return resp.credential  # type: ignore[no-any-return]

    def admin(self) -> object:
        return admin_stub(self.server.port, self.identity.ca, svid(self.identity.ca, ADMIN))

    def records(self, kind: str) -> list[dict[str, object]]:
        return [r for r in read_records(self.server.config.audit_path) if r["type"] == kind]


def sandbox_env(bao: OpenBaoDev, namespace: str = NS) -> EnvironmentConfig:
    return EnvironmentConfig(name="sandbox", addr=bao.addr, token=bao.root_token,
                             namespace=namespace)


@pytest.fixture(scope="module")
def world(bao: OpenBaoDev, identity: Identity) -> Iterator[World]:
    server = BrokerServer(broker_config(bao, identity, scope_map_path=MAP,
                                        default_environment="production",
                                        environments=(sandbox_env(bao),)))
    server.start()
    yield World(server=server, identity=identity, bao=bao)
    server.stop(grace=0)


def alive(bao: OpenBaoDev, accessor: str, namespace: str = "") -> bool:
    """Does OpenBao (in ``namespace``) know a live token behind ``accessor``? (Asked from
    the root about a namespace's token, OpenBao answers 500 "cannot lookup token in
    different namespace": not one of the root's.)"""
    try:
        client(bao, namespace).auth.token.lookup_accessor(accessor)
        return True
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return False
    except hvac.exceptions.InternalServerError as exc:
        assert "cannot lookup token in different namespace" in str(exc)
        return False


def reads(bao: OpenBaoDev, token: str, path: str, namespace: str = "") -> str | None:
    """What ``token`` reads at ``secret/<path>`` in ``namespace`` (None: refused)."""
    try:
        got = client(bao, namespace, token).secrets.kv.v2.read_secret_version(
            path=path, raise_on_deleted_version=False)
    except hvac.exceptions.Forbidden:
        return None
    return str(got["data"]["data"]["where"])


def policy(bao: OpenBaoDev, name: str, namespace: str = "") -> str | None:
    try:
        return str(client(bao, namespace).sys.read_policy(name)["data"]["rules"])
    except hvac.exceptions.InvalidPath:
        return None


def role(bao: OpenBaoDev, name: str, namespace: str = "") -> object:
    return client(bao, namespace).read(f"auth/token/roles/{name}")


def entity(bao: OpenBaoDev, entity_id: str, namespace: str = "") -> dict[str, object] | None:
    resp = client(bao, namespace).read(f"identity/entity/id/{entity_id}")
    return None if resp is None else dict(resp["data"])


def test_each_place_holds_only_the_classes_its_environment_allows(world: World) -> None:
    bao = world.bao
    assert "secret/data/soc/enrichment/*" in str(policy(bao, ENRICH, NS))
    assert role(bao, ENRICH, NS) is not None
    assert policy(bao, ENRICH) is None and role(bao, ENRICH) is None
    assert "secret/data/soc/tickets/*" in str(policy(bao, TICKET))
    assert role(bao, TICKET) is not None
    assert policy(bao, TICKET, NS) is None and role(bao, TICKET, NS) is None
    assert world.server.health is not None
    assert world.server.health.check_now(), world.server.health.problems


def test_a_sandbox_credential_is_a_token_of_the_namespace_only(world: World) -> None:
    bao = world.bao
    cred = world.issue("enrichment", "sandbox")
    assert alive(bao, cred.credential_id, NS)
    assert not alive(bao, cred.credential_id)  # the root has never heard of it
    assert cred.credential_id in client(bao, NS).list("auth/token/accessors")["data"]["keys"]
    assert cred.credential_id not in client(bao).list("auth/token/accessors")["data"]["keys"]
    assert reads(bao, cred.token, "soc/enrichment/ti", NS) == NS
    assert reads(bao, cred.token, "soc/tickets/t", NS) is None  # only its class's path
    assert reads(bao, cred.token, "soc/enrichment/ti") is None  # nothing at the root
    # its identity's token role and entity are the namespace's too
    who = identity_role_name(world.server.scope_maps.current.classes["enrichment"],  # type: ignore[union-attr]
                             TRIAGE)
    assert role(bao, who, NS) is not None and role(bao, who) is None
    me = client(bao, NS).auth.token.lookup_accessor(cred.credential_id)["data"]
    assert me["namespace_path"] == f"{NS}/" and me["entity_id"]
    ent = entity(bao, me["entity_id"], NS)
    assert ent is not None and ent["disabled"] is False
    assert entity(bao, me["entity_id"]) is None
    # production's class mints at the root and means nothing in the namespace
    prod = world.issue("ticket.comment", "production")
    assert alive(bao, prod.credential_id) and not alive(bao, prod.credential_id, NS)
    assert reads(bao, prod.token, "soc/tickets/t") == "root"
    assert reads(bao, prod.token, "soc/tickets/t", NS) is None
    minted = [r for r in world.records("credential.minted")
              if r["credential_id"] == cred.credential_id]
    assert minted[0]["environment"] == "sandbox"
    assert bao.root_token not in world.server.config.audit_path.read_text()


def test_a_hand_back_and_a_revoke_by_id_end_the_token_in_the_namespace(world: World) -> None:
    bao = world.bao
    back = world.issue("enrichment", "sandbox")
    by_id = world.issue("enrichment", "sandbox")
    stub(world.server.port, world.identity.ca, svid(world.identity.ca, TRIAGE)
         ).RevokeCredential(pb.RevokeCredentialRequest(credential_id=back.credential_id,
                                                       reason="done"), timeout=10)
    assert not alive(bao, back.credential_id, NS)
    assert reads(bao, back.token, "soc/enrichment/ti", NS) is None
    for _ in world.admin().RevokeCredentials(pb.RevokeCredentialsRequest(  # type: ignore[attr-defined]
            selector=pb.Selector(credential_ids=[by_id.credential_id]), reason="drill"),
            timeout=30):
        pass
    assert not alive(bao, by_id.credential_id, NS)
    # the broker revoked them (not "already dead"): it found them in the namespace
    revoked = {str(r["credential_id"]): r for r in world.records("credential.revoked")}
    assert revoked[back.credential_id]["result"] == "revoked"
    assert revoked[back.credential_id]["environment"] == "sandbox"
    bulk = [r for r in world.records("credentials.revoked")
            if by_id.credential_id in (r.get("environments") or {})]  # type: ignore[operator]
    assert bulk and bulk[-1]["counts"] == {"revoked": 1, "already_dead": 0, "pending": 0,
                                           "failed": 0}, bulk


def test_a_freeze_disables_the_entity_in_the_namespace_and_an_unfreeze_lifts_it(
        world: World) -> None:
    bao = world.bao
    sand = world.issue("enrichment", "sandbox")
    prod = world.issue("ticket.comment", "production")
    eid = client(bao, NS).auth.token.lookup_accessor(sand.credential_id)["data"]["entity_id"]
    admin = world.admin()
    resp = admin.Freeze(pb.FreezeRequest(spiffe_id=TRIAGE, reason="drill"),  # type: ignore[attr-defined]
                        timeout=30)
    try:
        assert not resp.vault_pending and resp.vault_entities_disabled == 2, resp
        assert entity(bao, eid, NS)["disabled"] is True  # type: ignore[index]
        assert reads(bao, sand.token, "soc/enrichment/ti", NS) is None  # refused at once
        assert reads(bao, prod.token, "soc/tickets/t") is None
        assert world.server.responder is not None
        thread = world.server.responder.last_freeze_revocation
        assert thread is not None
        thread.join(30)
        assert not alive(bao, sand.credential_id, NS)  # revoked by prefix in the namespace
        assert not alive(bao, prod.credential_id)
    finally:
        admin.Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="drill over"),  # type: ignore[attr-defined]
                       timeout=30)
    assert entity(bao, eid, NS)["disabled"] is False  # type: ignore[index]
    again = world.issue("enrichment", "sandbox")
    assert reads(bao, again.token, "soc/enrichment/ti", NS) == NS


def test_reconcile_revokes_a_lost_mint_in_the_namespace(world: World) -> None:
    responder = world.server.responder
    assert responder is not None
    store = responder.store
    cls = world.server.scope_maps.current.classes["enrichment"]  # type: ignore[union-attr]
    now = datetime.now(UTC)
    store.record_intent(request_id="lost-ns-mint", spiffe_id=TRIAGE, action_class=cls.name,
                        target="", event_source="", event_id="", at=now, environment="sandbox")
    store.mark_ambiguous("lost-ns-mint")
    minted = responder.vaults.vault("sandbox").mint(
        cls=cls, spiffe_id=SpiffeId.parse(TRIAGE), ttl_seconds=60, now=now,
        metadata={"request_id": "lost-ns-mint", "broker_instance": store.instance_id})
    assert alive(world.bao, minted.accessor, NS)
    report = responder.reconcile()
    assert report.revoked == 1 and not report.error, report
    assert not alive(world.bao, minted.accessor, NS)
    revoked = [r for r in world.records("credential.revoked")
               if r["credential_id"] == minted.accessor]
    assert revoked[0]["environment"] == "sandbox" and revoked[0]["selector"] == "reconcile"


def test_drift_in_the_namespace_is_put_back_there(world: World) -> None:
    bao = world.bao
    real = policy(bao, ENRICH, NS)
    client(bao, NS).sys.create_or_update_policy(ENRICH, 'path "*" {capabilities=["read"]}')
    report = world.server.check_vault_drift()
    assert report is not None and f"sandbox:{ENRICH}" in report.policies_written, report
    assert policy(bao, ENRICH, NS) == real
    assert policy(bao, ENRICH) is None  # nothing written at the root


def test_vault_sync_writes_the_namespace(
        world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.cli.main import main

    bao = world.bao
    client(bao, NS).write(f"auth/token/roles/{ENRICH}", renewable=True)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    monkeypatch.setenv("SANDBOX_TOKEN", bao.root_token)
    assert main(["vault", "sync", "--scope-map", str(MAP), "--json",
                 "--default-environment", "production", "--environment",
                 f"sandbox={bao.addr},token-env=SANDBOX_TOKEN,namespace={NS}"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert f"sandbox:{ENRICH}" in report["roles_written"], report
    assert f"production:{TICKET}" in report["unchanged"], report
    assert role(bao, ENRICH, NS)["data"]["renewable"] is False  # type: ignore[index]
    assert role(bao, ENRICH) is None and bao.root_token not in out


def test_a_misspelt_namespace_never_passes_for_dead_tokens(world: World) -> None:
    """A broker pointed at a namespace that does not exist (``sandbx``) must not read
    OpenBao's 404 as "no such token": it would record live credentials as revoked and
    drop lost mints unrevoked."""
    bao = world.bao
    cred = world.issue("enrichment", "sandbox")
    typo = VaultAdapter(addr=bao.addr, token=bao.root_token, namespace="sandbx")
    for act in (lambda: typo.lookup_accessor(cred.credential_id),
                lambda: typo.revoke_accessor(cred.credential_id),
                typo.list_accessors, lambda: typo.entity_of(TRIAGE), typo.health):
        with pytest.raises(VaultUnavailableError) as err:
            act()
        assert "namespace 'sandbx'" in str(err.value) and "does not exist" in str(err.value)
        assert "namespace=" in str(err.value)  # what to correct
    assert alive(bao, cred.credential_id, NS)
    problems = typo.check_capabilities()
    assert len(problems) == 1 and "namespace 'sandbx'" in problems[0], problems


def test_a_broker_whose_namespace_does_not_exist_says_so(
        bao: OpenBaoDev, identity: Identity) -> None:
    server = BrokerServer(broker_config(bao, identity, scope_map_path=MAP,
                                        default_environment="production",
                                        environments=(sandbox_env(bao, "nope"),)))
    server.start()
    try:
        assert server.health is not None
        assert not server.health.check_now()
        ours = [p for p in server.health.problems if "sandbox" in p]
        assert ours and all("namespace 'nope'" in p and "does not exist" in p for p in ours), \
            server.health.problems
        assert any(p.startswith("Vault (sandbox): ") for p in ours), ours
        assert bao.root_token not in " ".join(server.health.problems)
        with pytest.raises(grpc.RpcError) as err:
            stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
                pb.IssueCredentialRequest(action_class="enrichment", target="ws-7",
                                          environment="sandbox", initiating_event=EVENT,
                                          justification="drill"), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(err.value.trailing_metadata() or ())["credbroker-error-code"] == \
            "vault_unavailable"
    finally:
        server.stop(grace=0)
