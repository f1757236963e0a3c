"""Every person's act carries the person: a real broker, real OpenBao, the dev identity
provider served over HTTP, and the CLI run as a person would run it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.approvers import ApproverConfig
from broker.adapters.audit import read_records
from broker.app.people import PERSON_MD_KEY
from broker.cli.login import TokenCache
from broker.grpc.server import BrokerServer
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devidp import DevIdp
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import ADMIN, TRIAGE, Identity, broker_config
from tests.integration.helpers import admin_stub, svid
from tests.integration.test_revocation import _exists, mint

ROOT = Path(__file__).parents[2]
SOAR = "spiffe://example.org/soar/playbook"  # configured automation


@dataclass
class People:
    server: BrokerServer
    idp: DevIdp
    identity: Identity
    dev_dir: Path  # a dev.json naming this broker, the admin socket and the dev IdP
    issued: list[str] = field(default_factory=list)

    def admin(self, who: str = ADMIN) -> Any:
        return admin_stub(self.server.port, self.identity.ca, svid(self.identity.ca, who))

    def token(self, user: str, ttl: int = 300) -> str:
        token = self.idp.signer.id_token(user, audience=self.idp.client_id, ttl=ttl)
        self.issued.append(token)
        return token

    def md(self, user: str, ttl: int = 300) -> tuple[tuple[str, str], ...]:
        return ((PERSON_MD_KEY, f"Bearer {self.token(user, ttl)}"),)

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.server.config.audit_path) if r["type"] == kind]

    def registry(self, sql: str, *args: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.server.config.registry_path) as db:
            return db.execute(sql, args).fetchall()


@pytest.fixture
def people(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
           short_tmp: Path) -> Iterator[People]:
    d = Path(tempfile.mkdtemp(prefix="ppl-", dir=short_tmp))
    idp = DevIdp(d, interval=0.05)
    idp.start()
    server = BrokerServer(broker_config(
        bao, identity, automation_ids=(SOAR,),
        approvers=ApproverConfig(issuer=idp.issuer, jwks_path=idp.jwks_path)))
    server.start()
    (d / "dev.json").write_text(json.dumps({
        "broker_addr": f"127.0.0.1:{server.port}", "broker_dns_name": DEFAULT_BROKER_DNS,
        "workload_api_sockets": {"admin": identity.socket("admin")},
        "audit_path": str(server.config.audit_path),
        "dev_idp": {"issuer": idp.issuer, "url": idp.issuer, "client_id": idp.client_id}}))
    yield People(server=server, idp=idp, identity=identity, dev_dir=d)
    server.stop(grace=0)
    idp.stop()


def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


def test_acts_are_recorded_as_the_person_in_the_audit_log_and_the_registry(
        people: People, vault_root: hvac.Client) -> None:
    cred = mint(people.server, people.identity, TRIAGE)
    admin = people.admin()
    progress = list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
        selector=pb.Selector(credential_ids=[cred.credential_id]), reason="incident 12"),
        timeout=30, metadata=people.md("alice@example.org")))
    assert progress[-1].summary.revoked == 1 and not _exists(vault_root, cred.credential_id)
    resp = admin.Freeze(pb.FreezeRequest(action_class="enrichment", reason="bad feed"),
                        timeout=30, metadata=people.md("dave@example.org"))
    assert resp.freeze.by == "dave@example.org"
    listed = admin.ListFreezes(pb.ListFreezesRequest(), timeout=10).freezes  # no person needed
    assert [f.by for f in listed] == ["dave@example.org"]
    admin.Unfreeze(pb.UnfreezeRequest(action_class="enrichment", reason="feed fixed"),
                   timeout=30, metadata=people.md("alice@example.org"))

    revoked, by_freeze = people.records("credentials.revoked")  # the freeze's own bulk, too
    assert revoked["by"] == "alice@example.org" and revoked["reason"] == "incident 12"
    assert by_freeze["by"] == "dave@example.org" and by_freeze["actor"]["kind"] == "person"
    assert revoked["actor"] == {"kind": "person", "client": ADMIN, "issuer": people.idp.issuer,
                                "groups": ["ir-leads", "responders"]}
    (freeze,) = people.records("freeze")
    assert freeze["by"] == "dave@example.org" and freeze["actor"]["kind"] == "person"
    (unfreeze,) = people.records("unfreeze")
    assert unfreeze["by"] == "alice@example.org"
    assert people.registry("SELECT revoked_by FROM credentials WHERE credential_id=?",
                           cred.credential_id) == [("alice@example.org",)]
    assert people.registry("SELECT by, lifted_by FROM freezes") == [
        ("dave@example.org", "alice@example.org")]
    text = people.server.config.audit_path.read_text()
    leaked = any(t in text for t in people.issued)
    assert not leaked, "an ID token reached the audit log"


def test_without_a_person_acts_are_refused_with_the_login_hint(people: People) -> None:
    cred = mint(people.server, people.identity, TRIAGE)
    admin = people.admin()
    for call in (lambda: admin.Freeze(pb.FreezeRequest(action_class="enrichment", reason="r"),
                                      timeout=10),
                 lambda: list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
                     selector=pb.Selector(all=True), reason="r"), timeout=10)),
                 lambda: admin.Unfreeze(pb.UnfreezeRequest(action_class="enrichment",
                                                           reason="r"), timeout=10)):
        details = _refused(call, grpc.StatusCode.UNAUTHENTICATED)
        assert "run `credbroker login`" in details
    # Reading needs only the admin SVID.
    assert admin.ListCredentials(pb.Selector(all=True), timeout=10).credentials
    assert not people.records("freeze") and not people.records("credentials.revoked")
    # Each attempt is on the record as the tool that made it.
    refused = people.records("responder.refused")
    assert [(r["act"], r["target"], r["by"], r["actor"]) for r in refused] == [
        ("freeze", "action class enrichment", ADMIN, {"kind": "workload", "client": ADMIN}),
        ("revoke credentials", "", ADMIN, {"kind": "workload", "client": ADMIN}),
        ("unfreeze", "action class enrichment", ADMIN, {"kind": "workload", "client": ADMIN})]
    assert all("run `credbroker login`" in r["error"] for r in refused)
    assert _exists(hvac.Client(url=people.server.config.vault_addr,
                               token=people.server.config.vault_token), cred.credential_id)


def test_a_person_outside_the_responder_groups_is_permission_denied(people: People) -> None:
    details = _refused(lambda: people.admin().Freeze(
        pb.FreezeRequest(action_class="enrichment", reason="r"), timeout=10,
        metadata=people.md("carol@example.org")), grpc.StatusCode.PERMISSION_DENIED)
    assert "carol@example.org may not freeze: only members of responders" in details
    assert not people.records("freeze")
    (refused,) = people.records("responder.refused")  # the attempt is on the record as her
    assert (refused["act"], refused["target"], refused["by"]) == (
        "freeze", "action class enrichment", "carol@example.org")
    assert refused["actor"] == {"kind": "person", "client": ADMIN,
                                "issuer": people.idp.issuer, "groups": ["iam-leads"]}
    assert refused["error"] == details
    assert not any(t in people.server.config.audit_path.read_text() for t in people.issued)


def test_a_workload_that_is_not_an_administrator_is_refused_on_the_record(
        people: People) -> None:
    details = _refused(lambda: people.admin(TRIAGE).Freeze(
        pb.FreezeRequest(spiffe_id=TRIAGE, reason="r"), timeout=10,
        metadata=people.md("alice@example.org")), grpc.StatusCode.PERMISSION_DENIED)
    assert f"{TRIAGE} is not a credbroker administrator" in details
    assert not people.records("freeze")
    (refused,) = people.records("responder.refused")
    assert (refused["act"], refused["target"], refused["by"], refused["actor"]) == (
        "freeze", f"identity {TRIAGE}", TRIAGE, {"kind": "workload", "client": TRIAGE})


def test_an_expired_or_forged_token_is_refused(people: People, tmp_path: Path) -> None:
    expired = people.md("alice@example.org", ttl=-5)
    details = _refused(lambda: people.admin().Freeze(
        pb.FreezeRequest(action_class="enrichment", reason="r"), timeout=10,
        metadata=expired), grpc.StatusCode.UNAUTHENTICATED)
    assert "expired; run `credbroker login` again" in details
    forger = DevIdp(tmp_path)  # its own key, same claims
    forged = forger.signer.id_token("alice@example.org", issuer=people.idp.issuer)
    details = _refused(lambda: people.admin().Freeze(
        pb.FreezeRequest(action_class="enrichment", reason="r"), timeout=10,
        metadata=((PERSON_MD_KEY, f"Bearer {forged}"),)), grpc.StatusCode.UNAUTHENTICATED)
    assert "credbroker login" in details
    forger.stop()
    assert not people.records("freeze")


def test_configured_automation_acts_as_itself(people: People) -> None:
    resp = people.admin(SOAR).Freeze(pb.FreezeRequest(action_class="enrichment",
                                                      reason="playbook 7"), timeout=30)
    assert resp.freeze.by == f"automation:{SOAR}"
    (freeze,) = people.records("freeze")
    assert freeze["by"] == f"automation:{SOAR}"
    assert freeze["actor"] == {"kind": "automation", "client": SOAR}
    # Automation is not an administrator of anything else: another workload still is not.
    details = _refused(lambda: people.admin(TRIAGE).ListFreezes(pb.ListFreezesRequest(),
                                                               timeout=10),
                       grpc.StatusCode.PERMISSION_DENIED)
    assert "not a credbroker administrator" in details


def _cli(people: People, xdg: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CREDBROKER_BROKER", "SPIFFE_ENDPOINT_SOCKET",
                        "CREDBROKER_ID_TOKEN_FILE")}
    dev = [] if argv[0] == "logout" else ["--dev", str(people.dev_dir)]
    return subprocess.run([sys.executable, "-m", "broker.cli.main", *argv, *dev], cwd=ROOT,
                          env=env | {"XDG_CONFIG_HOME": str(xdg)}, capture_output=True,
                          text=True, timeout=120)


def test_login_then_freeze_through_the_cli(people: People, tmp_path: Path) -> None:
    xdg = tmp_path / "config"
    r = _cli(people, xdg, "freeze", "--action-class", "enrichment", "--reason", "r", "--yes")
    assert r.returncode == 3 and "run `credbroker login`" in r.stderr, r.stderr
    r = _cli(people, xdg, "login", "--as", "dave@example.org")
    assert r.returncode == 0, r.stderr
    assert "logged in as dave@example.org (groups: soc-analysts, responders)" in r.stdout
    cache = TokenCache(xdg / "credbroker")
    assert oct(cache.path.stat().st_mode & 0o777) == "0o600"
    assert oct(cache.path.parent.stat().st_mode & 0o777) == "0o700"
    token = cache.valid_token(datetime.now(UTC))
    outputs = [r.stdout + r.stderr]
    r = _cli(people, xdg, "freeze", "--action-class", "enrichment", "--reason", "bad feed",
             "--yes")
    assert r.returncode == 0, r.stderr
    outputs.append(r.stdout + r.stderr)
    r = _cli(people, xdg, "freeze", "--list")
    assert "by dave@example.org: bad feed" in r.stdout
    r = _cli(people, xdg, "unfreeze", "--action-class", "enrichment", "--reason", "fixed",
             "--yes", "--as", "carol@example.org")  # --as wins over the cached login
    assert r.returncode == 4 and "carol@example.org may not unfreeze" in r.stderr
    r = _cli(people, xdg, "logout")
    assert r.returncode == 0 and "logged out (dave@example.org)" in r.stdout
    assert not cache.path.exists()
    r = _cli(people, xdg, "unfreeze", "--action-class", "enrichment", "--reason", "fixed",
             "--yes")
    assert r.returncode == 3 and "credbroker login" in r.stderr
    r = _cli(people, xdg, "unfreeze", "--action-class", "enrichment", "--reason", "fixed",
             "--yes", "--as", "alice@example.org")
    assert r.returncode == 0, r.stderr
    outputs.append(r.stdout + r.stderr)
    assert [(f["by"]) for f in people.records("freeze")] == ["dave@example.org"]
    assert [(f["by"]) for f in people.records("unfreeze")] == ["alice@example.org"]
    leaked = any(token in o for o in outputs) or token in \
        people.server.config.audit_path.read_text()
    assert not leaked, "the ID token leaked into the CLI's output or the audit log"
