"""Runaway agents are stopped by the broker itself, or stop themselves, and are killed in one
Vault call per class: real OpenBao, real brokers, a real sidecar, the real SDK."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.approvers import ApproverConfig
from broker.adapters.audit import read_records
from broker.core.revocation import Selector
from broker.grpc.server import BrokerServer
from credbroker_dev.devidp import DevIdp
from credbroker_dev.devstack import OpenBaoDev, free_port
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    TRIAGE,
    Identity,
    broker_config,
    live_accessors,
    start_sidecar,
)
from tests.integration.helpers import EVENT, admin_stub, issue_request, stub, svid
from tests.integration.test_revocation import works

sys.path.insert(0, str(Path(__file__).parents[2] / "client"))  # the SDK as it is here
from credbroker_client import Client

MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/agent/triage, spiffe://example.org/agent/containment]
    limits: {per_workload: 3/h, on_exceed: freeze}
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
  lookup:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall, soc-manager]
    workloads: [spiffe://example.org/agent/triage, spiffe://example.org/agent/containment]
    targets: ["ok-*"]
    limits: {denials: 3/5m}
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
"""


class Webhook:
    """The escalation path: records what the broker POSTs."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.posts:
                if p.get("event") == event:
                    return p
            time.sleep(0.05)
        raise AssertionError(f"the escalation webhook never heard {event}: {self.posts}")


class Stack:
    def __init__(self, server: BrokerServer, identity: Identity, bao: OpenBaoDev,
                 hook: Webhook, idp: DevIdp, metrics_port: int) -> None:
        self.server, self.identity, self.bao, self.hook, self.idp = server, identity, bao, hook, idp
        self.metrics_port = metrics_port

    def issue(self, who: str, cls: str = "enrichment", target: str = "ok-1") -> pb.Credential:
        return stub(self.server.port, self.identity.ca, svid(self.identity.ca, who)
                    ).IssueCredential(issue_request(cls, target=target,
                                                    initiating_event=EVENT),
                                      timeout=10).credential

    def refused(self, who: str, cls: str = "enrichment", target: str = "ok-1"
                ) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.issue(who, cls, target)
        return err.value

    def admin(self) -> Any:
        return admin_stub(self.server.port, self.identity.ca, svid(self.identity.ca, ADMIN))

    def person(self, user: str = "alice@example.org") -> tuple[tuple[str, str], ...]:
        token = self.idp.signer.id_token(user, audience=self.idp.client_id, ttl=300)
        return (("authorization-person", f"Bearer {token}"),)

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.server.config.audit_path) if r["type"] == kind]

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()


@pytest.fixture
def stack(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
          short_tmp: Path, tmp_path: Path) -> Iterator[Stack]:
    scope = tmp_path / "map.yaml"
    scope.write_text(MAP)
    hook = Webhook()
    (tmp_path / "idp").mkdir()
    idp = DevIdp(tmp_path / "idp", interval=0.05)
    idp.start()
    port = free_port()
    server = BrokerServer(broker_config(
        bao, identity, scope_map_path=scope, metrics_listen=f"127.0.0.1:{port}",
        approvers=ApproverConfig(issuer=idp.issuer, jwks_path=idp.jwks_path,
                                 webhook_url=hook.url)))
    server.start()
    st = Stack(server, identity, bao, hook, idp, port)
    yield st
    # OpenBao is shared by the session: give every frozen entity back (a person lifts it).
    for sid in {f.pattern for f in server.responder.freezes}:  # type: ignore[union-attr]
        st.admin().Unfreeze(pb.UnfreezeRequest(spiffe_id=sid, reason="test over"), timeout=30,
                            metadata=st.person())
    server.stop(grace=0)
    idp.stop()
    hook.server.shutdown()


def _join_revocation(server: BrokerServer) -> None:
    assert server.responder is not None
    t = server.responder.last_freeze_revocation
    if t is not None:
        t.join(30)


def test_an_agent_over_budget_with_on_exceed_freeze_is_frozen_and_refused_by_openbao(
        stack: Stack) -> None:
    creds = [stack.issue(TRIAGE) for _ in range(3)]
    assert all(works(stack.bao, c) for c in creds)
    err = stack.refused(TRIAGE)  # the 4th: past 3/h
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "now frozen by the broker (rule enrichment.limits.on_exceed)" in str(err.details())
    # Vault itself refuses every token of it (asked with the token), at once.
    assert not any(works(stack.bao, c) for c in creds)
    assert stack.refused(TRIAGE).code() == grpc.StatusCode.FAILED_PRECONDITION  # frozen
    # Another identity is untouched.
    assert works(stack.bao, stack.issue(CONTAINMENT))
    (fz,) = stack.records("freeze")
    assert fz["by"] == "credbroker" and fz["rule"] == "enrichment.limits.on_exceed"
    assert fz["pattern"] == TRIAGE and fz["actor"]["kind"] == "credbroker"
    (enforced,) = stack.records("freeze.enforced")
    assert enforced["vault_entities_disabled"]
    post = stack.hook.wait_for("freeze.automatic")
    assert post["spiffe_id"] == TRIAGE and post["rule"] == "enrichment.limits.on_exceed"
    assert post["notify"] == ["soc-oncall"] and post["action_class"] == "enrichment"
    # Automation cannot lift it; a person can.
    with pytest.raises(grpc.RpcError) as err2:
        stack.admin().Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="looks fine"),
                               timeout=30)
    assert err2.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "only a person may lift that" in str(err2.value.details())
    (tried,) = stack.records("responder.refused")  # the attempt is on the record
    assert (tried["act"], tried["target"], tried["actor"]["kind"]) == (
        "unfreeze", f"identity {TRIAGE}", "automation")
    assert tried["by"].startswith("automation:") and "only a person" in tried["error"]
    assert stack.refused(TRIAGE).code() == grpc.StatusCode.FAILED_PRECONDITION  # still
    stack.admin().Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="budget raised"),
                           timeout=30, metadata=stack.person())
    assert stack.records("unfreeze")[0]["by"] == "alice@example.org"
    text = stack.metrics()
    assert ('credbroker_automatic_freezes_total{action_class="enrichment",rule="on_exceed"} 1.0'
            in text)
    assert ('credbroker_denials_total{action_class="enrichment",code="budget_exhausted"} 1.0'
            in text)
    assert 'credbroker_denials_total{action_class="enrichment",code="frozen"} 2.0' in text
    assert TRIAGE not in text  # never a label: identities are unbounded


def test_a_denial_storm_trips_the_freeze(stack: Stack) -> None:
    cred = stack.issue(CONTAINMENT, "enrichment")
    for _ in range(2):
        assert stack.refused(CONTAINMENT, "lookup", "evil-1").code() == \
            grpc.StatusCode.PERMISSION_DENIED
    assert works(stack.bao, cred) and not stack.records("freeze")
    err = stack.refused(CONTAINMENT, "lookup", "evil-2")  # the 3rd within 5m
    assert "rule lookup.limits.denials" in str(err.details())
    assert not works(stack.bao, cred)
    (fz,) = stack.records("freeze")
    assert fz["by"] == "credbroker" and fz["rule"] == "lookup.limits.denials"
    post = stack.hook.wait_for("freeze.automatic")
    assert post["notify"] == ["soc-oncall", "soc-manager"] and post["spiffe_id"] == CONTAINMENT
    assert "denied lookup 3 times" in post["reason"]
    assert works(stack.bao, stack.issue(TRIAGE, "lookup", "ok-2"))  # others unaffected
    assert ('credbroker_automatic_freezes_total{action_class="lookup",rule="denials"} 1.0'
            in stack.metrics())


def test_self_freeze_through_a_real_sidecar_cannot_be_undone_by_the_agent(
        stack: Stack, identity: Identity, short_tmp: Path) -> None:
    sock = short_tmp / "sc-self.sock"
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{stack.server.port}", sock)
    try:
        with Client(str(sock)) as agent:
            cred = agent.credential("enrichment", target="ok-1",
                                    initiating_event={"source": "splunk", "id": "N-1"})
            assert works(stack.bao, pb.Credential(token=cred.token))
            frozen = agent.freeze_self("prompt injection suspected in ticket 77")
            assert frozen["frozen"] is True and frozen["spiffe_id"] == TRIAGE
            assert frozen["by"] == f"self:{TRIAGE}" and frozen["vault_enforced"] is True
            assert not works(stack.bao, pb.Credential(token=cred.token))  # Vault refuses it
            status, body = sc.client.raw("POST", "/v1/credentials",
                                         {"action_class": "enrichment", "target": "ok-1"})
            assert status == 409 and body["error"]["code"] == "frozen"
            # Again: the same freeze, nothing new on record.
            assert agent.freeze_self("again")["freeze_id"] == frozen["freeze_id"]
            status, body = sc.client.raw("POST", "/v1/freeze", {})
            assert status == 400 and "reason is required" in body["error"]["message"]
        # The agent cannot unfreeze itself: it is no administrator.
        with pytest.raises(grpc.RpcError) as err:
            admin_stub(stack.server.port, identity.ca, svid(identity.ca, TRIAGE)).Unfreeze(
                pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="I am fine"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Nor can automation on its behalf.
        with pytest.raises(grpc.RpcError) as err:
            stack.admin().Unfreeze(pb.UnfreezeRequest(spiffe_id=TRIAGE, reason="x"),
                                   timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (fz,) = stack.records("freeze")
        assert fz["by"] == f"self:{TRIAGE}"
        assert fz["reason"] == "prompt injection suspected in ticket 77"
        assert fz["actor"]["kind"] == "self" and fz["actor"]["client"] == TRIAGE
        post = stack.hook.wait_for("freeze.self")
        assert post["spiffe_id"] == TRIAGE and "soc-oncall" in post["notify"]
        assert "credbroker_self_freezes_total 1.0" in stack.metrics()
        text = stack.server.config.audit_path.read_text()
        assert cred.token not in text
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def test_an_identity_freeze_revokes_by_prefix_and_leaves_no_live_token_of_it(
        stack: Stack, vault_root: hvac.Client) -> None:
    triage = [stack.issue(TRIAGE, "enrichment") for _ in range(2)] + \
        [stack.issue(TRIAGE, "lookup") for _ in range(2)]
    other = [stack.issue(CONTAINMENT, "enrichment"), stack.issue(CONTAINMENT, "lookup")]
    stack.admin().Freeze(pb.FreezeRequest(spiffe_id=TRIAGE, reason="runaway"), timeout=30)
    _join_revocation(stack.server)

    def holders() -> dict[str, str]:
        out = {}
        for acc in live_accessors(vault_root):
            try:
                meta = vault_root.auth.token.lookup_accessor(acc)["data"].get("meta") or {}
            except hvac.exceptions.VaultError:
                continue
            out[acc] = meta.get("spiffe_id", "")
        return out

    live = holders()
    assert TRIAGE not in live.values()  # listed with the root token: none of it lives
    assert not {c.credential_id for c in triage} & set(live)
    assert {c.credential_id for c in other} <= set(live)
    assert all(works(stack.bao, c) for c in other)
    bulk = [r for r in stack.records("credentials.revoked") if r.get("vault_revoke_prefixes")]
    assert bulk and bulk[0]["vault_revoke_prefixes"] == 2  # one call per class
    assert sorted(bulk[0]["credential_ids"]) == sorted(c.credential_id for c in triage)
    assert stack.server.store is not None
    assert not stack.server.store.live(Selector.build(spiffe_id=TRIAGE), datetime.now(UTC))
