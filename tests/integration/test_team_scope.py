"""Team-scoped responders and approvers: a map split across three teams' files, a real
broker on its own OpenBao, people's ID tokens from the dev issuer. What OpenBao, the
registry and the audit log say is asserted, not the broker's word."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.approvers import ApproverConfig, DevIssuer
from broker.adapters.audit import read_records
from broker.app.people import PERSON_MD_KEY
from broker.grpc.server import BrokerServer
from broker.wire.metadata import ERROR_CODE_MD_KEY
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import ADMIN, Identity, broker_config
from tests.integration.helpers import EVENT, admin_stub, approvals_stub, stub, svid
from tests.integration.test_revocation import _exists, works

SOC_AGENT = "spiffe://example.org/agent/soc-triage"
IR_AGENT = "spiffe://example.org/agent/ir-contain"
IAM_AGENT = "spiffe://example.org/agent/iam-bot"
RITA = "rita@example.org"  # ir-oncall: responder for team ir only
IAN = "ian@example.org"  # ir-leads: approver for team ir only
OLGA = "olga@example.org"  # iam-leads: not scoped
SCOPES = {"ir-oncall": ("ir",), "ir-leads": ("ir",)}


def _file(team: str, classes: str) -> str:
    return (f"apiVersion: credbroker/v1\nkind: ScopeMap\nmetadata: {{team: {team}}}\n"
            f"action_classes:\n{classes}")


def _cls(name: str, team: str, agent: str, path: str, approval: str = "") -> str:
    return f"""  {name}:
    risk: low
    owner: {{team: {team}, contact: {team}@example.org}}
    escalation: [{team}-oncall]
    workloads: [{agent}]
    credential:
      ttl: 5m
      max_ttl: 10m
      vault_policy: [{{path: "secret/data/soc/{path}/*", capabilities: [read]}}]
{approval}"""


APPROVAL = ("    approval: {mode: jit, approvers: [ir-leads, iam-leads], escalate_after: 5m, "
            "expires: 10m}\n")


@pytest.fixture(scope="module")
def own_bao(short_tmp: Path) -> Iterator[OpenBaoDev]:
    # Its own OpenBao: this map's sync would end the shared map's classes.
    server = OpenBaoDev(Path(tempfile.mkdtemp(prefix="teambao-", dir=short_tmp)))
    server.start()
    root = hvac.Client(url=server.addr, token=server.root_token)
    for path in ("enrichment", "containment", "identity"):
        root.secrets.kv.v2.create_or_update_secret(path=f"soc/{path}/x", secret={"k": "v"})
    yield server
    server.stop()


@dataclass
class Teams:
    server: BrokerServer
    identity: Identity
    idp: DevIssuer
    root: hvac.Client

    def md(self, who: str, *groups: str) -> tuple[tuple[str, str], ...]:
        return ((PERSON_MD_KEY, f"Bearer {self.idp.id_token(who, groups=groups)}"),)

    def admin(self) -> Any:
        return admin_stub(self.server.port, self.identity.ca, svid(self.identity.ca, ADMIN))

    def approvals(self) -> Any:
        return approvals_stub(self.server.port, self.identity.ca,
                              svid(self.identity.ca, ADMIN))

    def issue(self, agent: str, cls: str) -> pb.IssueCredentialResponse:
        return stub(self.server.port, self.identity.ca, svid(self.identity.ca, agent)
                    ).IssueCredential(pb.IssueCredentialRequest(
                        action_class=cls, target="t", initiating_event=EVENT,
                        justification="incident 7"), timeout=30)

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.server.config.audit_path) if r["type"] == kind]

    def registry(self, sql: str, *args: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.server.config.registry_path) as db:
            return db.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def teams(own_bao: OpenBaoDev, identity: Identity, short_tmp: Path) -> Iterator[Teams]:
    d = Path(tempfile.mkdtemp(prefix="teams-", dir=short_tmp))
    maps = d / "maps"
    maps.mkdir()
    (maps / "soc.yaml").write_text(_file("soc", _cls("soc.enrich", "soc", SOC_AGENT,
                                                     "enrichment")))
    (maps / "ir.yaml").write_text(_file("ir", _cls("ir.contain", "ir", IR_AGENT, "containment")
                                        + _cls("ir.isolate", "ir", IR_AGENT, "containment",
                                               APPROVAL)))
    (maps / "iam.yaml").write_text(_file("iam", _cls("iam.disable", "iam", IAM_AGENT,
                                                     "identity", APPROVAL)))
    idp = DevIssuer(d)
    server = BrokerServer(broker_config(
        own_bao, identity, scope_map_path=maps, automation_ids=(),
        responder_groups=("responders", "ir-oncall"), team_scopes=SCOPES,
        approvers=ApproverConfig(issuer=DevIssuer.ISSUER, jwks_path=idp.jwks_path)))
    server.start()
    yield Teams(server=server, identity=identity, idp=idp,
                root=hvac.Client(url=own_bao.addr, token=own_bao.root_token))
    server.stop(grace=0)


def _outside_team(call: Any) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert dict(err.value.trailing_metadata())[ERROR_CODE_MD_KEY] == "outside_team"
    return str(err.value.details())


def test_a_team_responder_freezes_its_own_agent_and_no_other_teams(
        teams: Teams, own_bao: OpenBaoDev) -> None:
    ir_cred = teams.issue(IR_AGENT, "ir.contain").credential
    soc_cred = teams.issue(SOC_AGENT, "soc.enrich").credential
    assert works(own_bao, ir_cred, "soc/containment/x")
    admin = teams.admin()
    rita = teams.md(RITA, "ir-oncall")

    resp = admin.Freeze(pb.FreezeRequest(spiffe_id=IR_AGENT, reason="rogue"), timeout=30,
                        metadata=rita)
    assert resp.freeze.by == RITA
    assert not works(own_bao, ir_cred, "soc/containment/x")  # OpenBao refuses it now

    # Another team's agent, its class, a pattern over every agent, its credential: refused.
    for call, owner in (
            (lambda: admin.Freeze(pb.FreezeRequest(spiffe_id=SOC_AGENT, reason="r"),
                                  timeout=30, metadata=rita), "class soc.enrich (team soc)"),
            (lambda: admin.Freeze(pb.FreezeRequest(action_class="iam.disable", reason="r"),
                                  timeout=30, metadata=rita),
             "class iam.disable is owned by team iam"),
            (lambda: admin.Freeze(pb.FreezeRequest(spiffe_id="spiffe://example.org/agent/*",
                                                   reason="r"), timeout=30, metadata=rita),
             "class iam.disable (team iam) lists spiffe://example.org/agent/iam-bot"),
            (lambda: list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
                selector=pb.Selector(credential_ids=[soc_cred.credential_id]), reason="r"),
                timeout=30, metadata=rita)), "1 credential(s) of class soc.enrich (team soc)")):
        details = _outside_team(call)
        assert "you act for team ir only" in details and owner in details, details
    # Nothing changed in OpenBao or the registry for team soc.
    assert works(own_bao, soc_cred, "soc/enrichment/x")
    assert _exists(teams.root, soc_cred.credential_id)
    assert teams.registry("SELECT kind, pattern FROM freezes WHERE lifted_at IS NULL") == [
        ("spiffe_id", IR_AGENT)]
    assert teams.registry("SELECT state FROM credentials WHERE credential_id=?",
                          soc_cred.credential_id) == [("live",)]
    # Reading is not scoped: the whole incident is visible.
    listed = admin.ListCredentials(pb.Selector(all=True), timeout=10).credentials
    assert {c.credential_id for c in listed} >= {soc_cred.credential_id}

    (freeze,) = teams.records("freeze")
    assert freeze["by"] == RITA and freeze["actor"]["teams"] == ["ir"]
    refused = teams.records("responder.refused")
    assert [r["act"] for r in refused] == ["freeze", "freeze", "freeze", "revoke"]
    assert all(r["by"] == RITA and r["actor"]["teams"] == ["ir"] for r in refused)
    assert "team soc" in refused[0]["error"] and refused[0]["target"] == f"identity {SOC_AGENT}"

    admin.Unfreeze(pb.UnfreezeRequest(spiffe_id=IR_AGENT, reason="contained"), timeout=30,
                   metadata=rita)
    # Unscoped responders keep full power.
    admin.Freeze(pb.FreezeRequest(action_class="soc.enrich", reason="bad feed"), timeout=30,
                 metadata=teams.md("alice@example.org", "responders"))
    assert not works(own_bao, soc_cred, "soc/enrichment/x")
    admin.Unfreeze(pb.UnfreezeRequest(action_class="soc.enrich", reason="fixed"), timeout=30,
                   metadata=teams.md("alice@example.org", "responders"))


def test_a_team_approver_decides_only_its_teams_approvals(teams: Teams) -> None:
    ir_pending = teams.issue(IR_AGENT, "ir.isolate").approval
    iam_pending = teams.issue(IAM_AGENT, "iam.disable").approval
    api = teams.approvals()

    def decide(approval_id: str, who: str, group: str) -> pb.ApprovalInfo:
        return api.Approve(pb.ApprovalDecisionRequest(
            approval_id=approval_id, reason=f"{who} decides"), timeout=10,
            metadata=teams.md(who, group))

    details = _outside_team(lambda: decide(iam_pending.id, IAN, "ir-leads"))
    assert "class iam.disable is owned by team iam" in details
    assert "ask team iam's approvers" in details
    # Nothing changed: still pending, no vote.
    (still,) = [a for a in api.ListApprovals(pb.ListApprovalsRequest(), timeout=10).approvals
                if a.id == iam_pending.id]
    assert still.state == "pending" and not still.votes

    assert decide(ir_pending.id, IAN, "ir-leads").state == "approved"
    assert decide(iam_pending.id, OLGA, "iam-leads").state == "approved"  # not scoped

    (refused,) = teams.records("approval.refused")
    assert refused["approver"] == IAN and refused["teams"] == ["ir"]
    assert refused["owner_team"] == "iam" and refused["approval_id"] == iam_pending.id
    approved = {r["approval_id"]: r for r in teams.records("approval.approved")}
    assert approved[ir_pending.id]["teams"] == ["ir"]
    assert "teams" not in approved[iam_pending.id]
