"""JIT approval end to end: real broker, real sidecar, real OpenBao, ID tokens from the dev IdP."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.approvers import ApproverConfig, DevIssuer
from broker.adapters.audit import read_records
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    Identity,
    Sidecar,
    broker_config,
    start_sidecar,
    vault_as,
)
from tests.integration.helpers import approvals_stub, stub, svid

MAP = Path(__file__).parent.parent / "data" / "approvals-map.yaml"
EVENT = {"source": "splunk", "id": "N-77", "summary": "C2"}
ISOLATE = {"action_class": "containment.isolate_host", "target": "ws-7",
           "initiating_event": EVENT, "justification": "isolate ws-7"}


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


class Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Env:
    server: BrokerServer
    clock: Clock
    idp: DevIssuer
    sidecar: Sidecar
    identity: Identity
    hooks: list[dict[str, Any]]

    def api(self, who: str = ADMIN) -> Any:
        return approvals_stub(self.server.port, self.identity.ca,
                              svid(self.identity.ca, who, ttl=timedelta(hours=3)))

    def decide(self, approval_id: str, user: str, *, approve: bool = True,
               token: str | None = None) -> pb.ApprovalInfo:
        req = pb.ApprovalDecisionRequest(approval_id=approval_id, reason=f"{user} decides",
                                         id_token=token or self.idp.id_token(user))
        call = self.api().Approve if approve else self.api().Deny
        return call(req, timeout=10)  # type: ignore[no-any-return]


@pytest.fixture
def env(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
        short_tmp: Path) -> Iterator[Env]:
    d = Path(tempfile.mkdtemp(prefix="appr-", dir=short_tmp))
    idp = DevIssuer(d)
    hook_server = HTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()
    Hooks.received = []
    clock = Clock()
    cfg = broker_config(bao, identity, scope_map_path=MAP, approvers=ApproverConfig(
        issuer=DevIssuer.ISSUER, jwks_path=idp.jwks_path,
        bots={CONTAINMENT: ("ir-leads",)},
        webhook_url=f"http://127.0.0.1:{hook_server.server_port}/hook"))
    server = BrokerServer(cfg, clock=clock)
    server.start()
    sc = start_sidecar(identity, "containment", f"127.0.0.1:{server.port}", d / "sc.sock")
    yield Env(server=server, clock=clock, idp=idp, sidecar=sc, identity=identity,
              hooks=Hooks.received)
    sc.http.close()
    sc.service.stop_watching()
    sc.service.client.close()
    server.stop(grace=0)
    hook_server.shutdown()


def ask(env: Env, **extra: Any) -> tuple[int, dict[str, Any]]:
    return env.sidecar.client.raw("POST", "/v1/credentials", {**ISOLATE, **extra})


def test_approved_credential_reaches_the_waiting_sidecar(env: Env, bao: OpenBaoDev) -> None:
    status, pending = ask(env)
    assert status == 202 and pending["status"] == "pending"
    assert pending["approvers"] == ["ir-leads"] and pending["poll"].startswith("/v1/approvals/")
    listed = env.api().ListApprovals(pb.ListApprovalsRequest(), timeout=10).approvals
    assert [a.id for a in listed] == [pending["approval_id"]]
    assert listed[0].request.target == "ws-7" and listed[0].request_hash.startswith("sha256:")
    result: dict[str, Any] = {}

    def wait() -> None:
        result["status"], result["body"] = env.sidecar.client.raw(
            "GET", f"/v1/approvals/{pending['approval_id']}?wait=20")

    waiter = threading.Thread(target=wait)
    waiter.start()
    info = env.decide(pending["approval_id"], "alice@example.org")
    assert info.state == "approved" and info.votes[0].subject == "alice@example.org"
    waiter.join(25)
    assert result["status"] == 200, result
    cred = result["body"]
    assert cred["approval"]["approved_by"] == ["alice@example.org"]
    vault_as(bao, cred["token"]).secrets.kv.v2.read_secret_version(
        path="soc/containment/edr", raise_on_deleted_version=False)
    # used once: asking again with the same approval is refused
    status, body = ask(env, approval_id=pending["approval_id"])
    assert status == 403 and "already used" in body["error"]["message"]
    records = list(read_records(env.server.config.audit_path))
    kinds = [r["type"] for r in records if r.get("approval_id") == pending["approval_id"]]
    # used only once the credential exists: a failed mint does not burn the approval
    assert kinds[:4] == ["approval.requested", "approval.approved", "decision",
                         "approval.used"], kinds
    assert kinds[-1] == "decision"  # the refused second use is on record too
    assert "approval.used" in kinds
    minted = [r for r in records if r["type"] == "decision" and r.get("approvers")]
    assert minted and minted[-1]["approvers"] == ["alice@example.org"]


def test_denied(env: Env) -> None:
    _, pending = ask(env)
    env.decide(pending["approval_id"], "bob@example.org", approve=False)
    status, body = env.sidecar.client.raw("GET", f"/v1/approvals/{pending['approval_id']}")
    assert status == 403 and body["error"]["code"] == "approval_denied"
    assert "bob@example.org" in body["error"]["message"]


def test_expired_requests_are_denied_and_the_agent_is_told_why(env: Env) -> None:
    _, pending = ask(env)
    env.clock.offset = timedelta(minutes=10, seconds=1)
    assert env.server.desk is not None
    env.server.desk.tick_all()
    status, body = env.sidecar.client.raw("GET", f"/v1/approvals/{pending['approval_id']}")
    assert status == 403 and body["error"]["code"] == "approval_expired"
    assert "no decision before" in body["error"]["message"]


def test_escalation_webhook_fires_at_the_right_time(env: Env) -> None:
    _, pending = ask(env)
    assert env.server.desk is not None
    env.clock.offset = timedelta(minutes=4, seconds=59)
    env.server.desk.tick_all()
    assert env.hooks == []
    env.clock.offset = timedelta(minutes=5)
    env.server.desk.tick_all()
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while not env.hooks and datetime.now(UTC) < deadline:
        threading.Event().wait(0.05)
    assert [h["notify"] for h in env.hooks] == ["ir-oncall"]
    assert env.hooks[0]["approval_id"] == pending["approval_id"]
    env.server.desk.tick_all()  # nothing new until the next step of the path
    assert len(env.hooks) == 1
    escalated = [r for r in read_records(env.server.config.audit_path)
                 if r["type"] == "approval.escalated"]
    assert escalated[0]["notified"] == ["ir-oncall"]


def test_self_approval_double_approval_and_outsiders_are_refused(env: Env) -> None:
    status, pending = ask(env)
    with pytest.raises(grpc.RpcError) as err:  # the requesting agent, configured as a bot
        env.api(CONTAINMENT).Approve(pb.ApprovalDecisionRequest(
            approval_id=pending["approval_id"], reason="me"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "separation of duties" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        env.decide(pending["approval_id"], "dave@example.org")
    assert "none of the groups" in err.value.details()
    status, two = env.sidecar.client.raw("POST", "/v1/credentials", {
        "action_class": "identity.disable_account", "target": "user-9",
        "initiating_event": EVENT})
    assert status == 202 and two["approvals_required"] == 2
    env.decide(two["approval_id"], "alice@example.org")
    with pytest.raises(grpc.RpcError) as err:
        env.decide(two["approval_id"], "alice@example.org")
    assert "already approved" in err.value.details()
    assert env.decide(two["approval_id"], "carol@example.org").state == "approved"
    # Every refused attempt is on the record with who made it and why it was refused.
    refused = [r for r in read_records(env.server.config.audit_path)
               if r["type"] == "approval.refused"]
    assert [(r["approval_id"], r["act"], r["by"], r["via"]) for r in refused] == [
        (pending["approval_id"], "approve", CONTAINMENT, "spiffe"),
        (pending["approval_id"], "approve", "dave@example.org", "oidc"),
        (two["approval_id"], "approve", "alice@example.org", "oidc")]
    assert "separation of duties" in refused[0]["error"]
    assert "none of the groups" in refused[1]["error"]
    assert "already approved" in refused[2]["error"]
    assert refused[1]["spiffe_id"] == CONTAINMENT and refused[1]["action_class"] == (
        "containment.isolate_host")


@pytest.mark.parametrize("field", ["target", "justification", "initiating_event", "ttl_seconds"])
def test_an_approval_cannot_release_a_different_request(env: Env, field: str) -> None:
    _, pending = ask(env)
    env.decide(pending["approval_id"], "alice@example.org")
    changed = {"target": "ws-8", "justification": "other",
               "initiating_event": {"source": "splunk", "id": "N-78"}, "ttl_seconds": 60}[field]
    status, body = ask(env, approval_id=pending["approval_id"], **{field: changed})
    assert status == 403 and "different request" in body["error"]["message"]
    status, body = ask(env, approval_id=pending["approval_id"])
    assert status == 200 and body["approval"]["status"] == "used"


def test_break_glass_issues_at_once_with_the_shorter_ttl_and_awaits_review(env: Env) -> None:
    status, body = ask(env, break_glass=True)
    assert status == 200, body
    assert body["ttl_seconds"] <= 60 and body["approval"]["status"] == "break_glass"
    review = env.api().ListApprovals(pb.ListApprovalsRequest(review=True), timeout=10).approvals
    assert [a.id for a in review] == [body["approval"]["approval_id"]]
    with pytest.raises(grpc.RpcError) as err:  # alice is not a reviewer
        env.api().SignOff(pb.ApprovalDecisionRequest(
            approval_id=review[0].id, reason="ok",
            id_token=env.idp.id_token("alice@example.org")), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    signed = env.api().SignOff(pb.ApprovalDecisionRequest(
        approval_id=review[0].id, reason="justified: active C2",
        id_token=env.idp.id_token("bob@example.org")), timeout=10)
    assert signed.state == "reviewed"
    assert not env.api().ListApprovals(pb.ListApprovalsRequest(review=True),
                                       timeout=10).approvals
    status, body = ask(env, break_glass=True, initiating_event=None)
    assert status == 400 and "requires initiating_event" in body["error"]["message"]
    status, body = ask(env, break_glass=True, justification="")
    assert status == 403 and "needs a justification" in body["error"]["message"]


def test_break_glass_is_rate_limited_and_every_use_reaches_the_escalation_path(
        env: Env) -> None:
    status, first = ask(env, break_glass=True)
    assert status == 200, first
    status, body = ask(env, break_glass=True, target="ws-8")  # the map's default: 1/h
    assert status == 429 and body["error"]["code"] == "break_glass_limited", body
    assert 3500 <= body["error"]["retry_after_seconds"] <= 3601  # also the Retry-After header
    assert "ask for approval instead" in body["error"]["message"]
    records = list(read_records(env.server.config.audit_path))
    refused = [r for r in records if r["type"] == "approval.break_glass_refused"]
    assert len(refused) == 1 and refused[0]["spiffe_id"] == CONTAINMENT
    used = [r for r in records if r["type"] == "approval.break_glass"]
    assert used[-1]["notified"] == ["ir-oncall", "incident-commander"]
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while len(env.hooks) < 2 and datetime.now(UTC) < deadline:
        threading.Event().wait(0.05)
    events = sorted(h["event"] for h in env.hooks)
    assert events == ["approval.break_glass", "approval.break_glass_refused"], events
    for target in ("ws-10", "ws-11"):  # an agent looping on break-glass...
        assert ask(env, break_glass=True, target=target)[0] == 429
    threading.Event().wait(0.3)
    # ... is on the record each time, but the escalation path hears once per window
    assert len([h for h in env.hooks if h["event"] == "approval.break_glass_refused"]) == 1
    assert len([r for r in read_records(env.server.config.audit_path)
                if r["type"] == "approval.break_glass_refused"]) == 3
    status, body = ask(env, target="ws-8")  # the normal path stays open: ask a person
    assert status == 202, body


def test_bad_id_tokens_and_unknown_approvals(env: Env, short_tmp: Path) -> None:
    _, pending = ask(env)
    other = DevIssuer(Path(tempfile.mkdtemp(dir=short_tmp)))
    cases = {
        "forged": (other.id_token("alice@example.org"), "key id"),
        "expired": (env.idp.id_token("alice@example.org", ttl=-60), "expired"),
        "audience": (env.idp.id_token("alice@example.org", audience="other-app"),
                     "credbroker-approvals"),
        "issuer": (env.idp.id_token("alice@example.org", issuer="https://evil.example"),
                   "accept only"),
        "garbage": ("not-a-token", "not a JWT"),
    }
    for name, (token, words) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            env.decide(pending["approval_id"], "alice@example.org", token=token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert words in err.value.details(), (name, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        env.decide("apr-nope", "alice@example.org")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # a workload that is neither admin nor bot
        approvals_stub(env.server.port, env.identity.ca,
                       svid(env.identity.ca, "spiffe://example.org/agent/triage")).ListApprovals(
            pb.ListApprovalsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    s = stub(env.server.port, env.identity.ca, svid(env.identity.ca, CONTAINMENT))
    with pytest.raises(grpc.RpcError) as err:
        s.AwaitApproval(pb.AwaitApprovalRequest(approval_id="apr-nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_approvals_cli(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from broker.cli.main import main

    conn = ["--broker", f"127.0.0.1:{env.server.port}", "--workload-api",
            env.identity.socket("admin")]
    _, pending = ask(env)
    assert main(["approvals", "list", *conn]) == 0
    out = capsys.readouterr().out
    assert pending["approval_id"] in out and "wants containment.isolate_host target ws-7" in out
    token = tmp_path / "id_token"
    token.write_text(env.idp.id_token("alice@example.org"))
    assert main(["approvals", "approve", pending["approval_id"], "--reason", "go",
                 "--id-token-file", str(token), *conn]) == 0
    assert "is now approved" in capsys.readouterr().out
    assert main(["approvals", "deny", pending["approval_id"], "--reason", "late",
                 "--id-token-file", str(token), *conn]) == 4
    assert "not pending" in capsys.readouterr().err
    assert main(["approvals", "approve", "x", "--reason", "r", "--as", "alice", *conn]) == 2
    assert "--as USER only works with --dev" in capsys.readouterr().err
    assert main(["approvals", "approve", "x", *conn]) == 2
    assert "--reason is required" in capsys.readouterr().err


def test_a_released_credential_is_never_served_from_the_cache(env: Env) -> None:
    _, pending = ask(env)
    env.decide(pending["approval_id"], "alice@example.org")
    status, released = env.sidecar.client.raw(
        "GET", f"/v1/approvals/{pending['approval_id']}?wait=5")
    assert status == 200 and released["approval"]["status"] == "used"
    # the same class and target, another event: needs its own approval, not the cached token
    status, body = ask(env, initiating_event={"source": "splunk", "id": "OTHER"})
    assert status == 202 and body["approval_id"] != pending["approval_id"]
    assert len(env.sidecar.service.cache) == 0


def test_deciding_needs_a_person_whose_token_may_come_in_metadata(env: Env) -> None:
    from broker.app.people import PERSON_MD_KEY

    _, pending = ask(env)
    request = pb.ApprovalDecisionRequest(approval_id=pending["approval_id"], reason="C2 seen")
    with pytest.raises(grpc.RpcError) as err:  # the admin SVID alone is not a person
        env.api().Approve(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "run `credbroker login`" in err.value.details()
    expired = env.idp.id_token("alice@example.org", ttl=-5)
    with pytest.raises(grpc.RpcError) as err:
        env.api().Approve(request, timeout=10,
                          metadata=((PERSON_MD_KEY, f"Bearer {expired}"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired; run `credbroker login` again" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # two different people at once
        env.api().Approve(pb.ApprovalDecisionRequest(
            approval_id=pending["approval_id"], reason="x",
            id_token=env.idp.id_token("bob@example.org")), timeout=10, metadata=(
                (PERSON_MD_KEY, f"Bearer {env.idp.id_token('alice@example.org')}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    token = env.idp.id_token("alice@example.org")
    info = env.api().Approve(request, timeout=10, metadata=((PERSON_MD_KEY, f"Bearer {token}"),))
    assert info.state == "approved" and info.votes[0].subject == "alice@example.org"
    approved = [r for r in read_records(env.server.config.audit_path)
                if r["type"] == "approval.approved"]
    assert approved[-1]["approver"] == "alice@example.org" and approved[-1]["via"] == "oidc"
    leaked = token in env.server.config.audit_path.read_text()
    assert not leaked, "the ID token reached the audit log"
