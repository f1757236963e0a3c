"""The issuance use case, field by field: what Vault is asked, what the registry and the
audit log hold, what the escalation path hears and what an operator reads in the log.

Each test isolates one mechanism the broad tests of ``test_issuance.py`` pass through
without looking (found by mutation testing, docs/mutation.md): the mint's metadata and
environment, the intent's initiating event, the record of a credential revoked because it
could not be handed out (and the log lines when even that fails), the automatic freezes of
``limits`` and the self-freeze. Same world: the real SQLite store, the real audit file, a
real local webhook as the escalation path, Vault a scripted token table.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.approvers import ApproverConfig
from broker.adapters.audit import read_records
from broker.adapters.environments import Environments
from broker.adapters.registry import StoreError
from broker.app.approval_desk import ApprovalDesk
from broker.app.budget import StoreBudget
from broker.app.issuance import DenialCounter, DeniedByPolicy, Issued, Issuer, PendingApproval
from broker.app.responder import Responder, RevocationBus
from broker.core.approvals import ApprovalError, Approver
from broker.core.limits import Trip
from broker.core.models import Caller, CredentialRequest, Outcome
from broker.core.scopemap import parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import AuditError, FrozenError, VaultError, VaultUnavailableError
from broker.grpc.observability import Metrics
from tests.unit.broker.test_issuance import (
    EVENT,
    T0,
    FailingAudit,
    FailingStore,
    Maps,
    ScriptedVault,
)

TRIAGE = SpiffeId.parse("spiffe://example.org/agent/triage")
VENDOR = SpiffeId.parse("spiffe://vendor.example/agent/triage")
CONTAINMENT = SpiffeId.parse("spiffe://example.org/agent/containment")

MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/agent/triage, spiffe://example.org/agent/containment]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
  spend.once:
    risk: high
    owner: {team: incident-response, contact: ir@example.org}
    escalation: [ir-oncall, incident-commander]
    workloads: [spiffe://example.org/agent/containment]
    limits: {per_workload: 1/h, on_exceed: freeze}
    credential:
      ttl: 1m
      max_ttl: 2m
      vault_policy:
        - path: secret/data/soc/spend/*
          capabilities: [read]
  lookup:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall, soc-manager]
    workloads: [spiffe://example.org/agent/triage, spiffe://example.org/agent/containment]
    targets: ["ok-*"]
    limits: {denials: 2/5m}
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/lookup/*
          capabilities: [read]
  vendor.enrichment:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://vendor.example/agent/triage]
    federated: allow
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
  vendor.lookup:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://vendor.example/agent/triage]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/lookup/*
          capabilities: [read]
  revoke.tokens:
    risk: destructive
    owner: {team: identity-security, contact: iam@example.org}
    escalation: [iam-oncall, soc-oncall]
    workloads: [spiffe://example.org/agent/containment]
    limits: {per_workload: 5/h}
    approval:
      mode: jit
      approvers: [ir-leads]
      break_glass: {allowed: true, max_ttl: 30s, reviewers: [ir-leads], limit: 5/h}
    credential:
      ttl: 1m
      max_ttl: 2m
      vault_policy:
        - path: secret/data/soc/identity/*
          capabilities: [read]
"""


class Webhook:
    """The escalation path: a real HTTP endpoint that keeps what the broker POSTs."""

    def __init__(self) -> None:
        self.posts: queue.Queue[dict[str, Any]] = queue.Queue()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                posts.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self) -> dict[str, Any]:
        return self.posts.get(timeout=10)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    issuer: Issuer
    vaults: dict[str, ScriptedVault]
    store: FailingStore
    audit: FailingAudit
    audit_path: Path
    db_path: Path
    responder: Responder
    desk: ApprovalDesk
    metrics: Metrics
    hook: Webhook

    def records(self, event: str) -> list[dict[str, Any]]:
        """The records of ``event``, without what every record has (time, seq, hash)."""
        return [{k: v for k, v in r.items() if k not in ("time", "seq", "hash")}
                for r in read_records(self.audit_path) if r["type"] == event]

    def revoked_columns(self, credential_id: str) -> tuple[Any, ...]:
        """What the registry file says of a revocation (read with sqlite3 itself)."""
        with sqlite3.connect(self.db_path) as db:
            row = db.execute("SELECT state, revoked_at, revoked_by, revoke_reason, "
                             "revoke_selector, revoke_pending, revoke_error FROM credentials "
                             "WHERE credential_id=?", (credential_id,)).fetchone()
        return tuple(row)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def _world(tmp_path: Path, environments: tuple[str, ...] = (),
           decided_at: datetime = T0) -> Iterator[World]:
    """``decided_at``: the issuer's clock (the audit log's is T0)."""
    scope_map = parse_scope_map([("map.yaml", MAP)])
    db_path = tmp_path / "registry.db"
    store = FailingStore(db_path)
    audit_path = tmp_path / "audit.log"
    audit = FailingAudit(audit_path, clock=lambda: T0)
    if environments:
        vaults = {name: ScriptedVault() for name in environments}
        envs = Environments(vaults, default=environments[0], declared=True)  # type: ignore[arg-type]
    else:
        vaults = {"": ScriptedVault()}
        envs = Environments.single(vaults[""])  # type: ignore[arg-type]
    first = next(iter(vaults.values()))
    responder = Responder(store=store, vault=first,  # type: ignore[arg-type]
                          audit=audit, bus=RevocationBus(), scope_map=lambda: scope_map,
                          clock=lambda: T0, environments=envs)
    hook = Webhook()
    desk = ApprovalDesk(store=store, audit=audit, config=ApproverConfig(webhook_url=hook.url),
                        clock=lambda: T0)
    metrics = Metrics()
    issuer = Issuer(scope_maps=Maps(scope_map), vaults=envs,
                    store=store, budget=StoreBudget(store), audit=audit, responder=responder,
                    desk=desk, clock=lambda: decided_at, metrics=metrics)
    yield World(issuer=issuer, vaults=vaults, store=store, audit=audit, audit_path=audit_path,
                db_path=db_path, responder=responder, desk=desk, metrics=metrics, hook=hook)
    issuer.close()
    hook.close()


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    yield from _world(tmp_path)


@pytest.fixture
def envs(tmp_path: Path) -> Iterator[World]:
    yield from _world(tmp_path, ("prod", "lab"))


def caller(sid: SpiffeId) -> Caller:
    return Caller(spiffe_id=sid, x509_serial="0a1b", jwt_id="jti-7")


def request(cls: str = "enrichment", target: str = "host-1", **kw: Any) -> CredentialRequest:
    return CredentialRequest(action_class=cls, target=target, initiating_event=EVENT,
                             justification="phishing case 42", **kw)


# -- the mint and its intent


def test_vault_is_asked_for_the_callers_token_with_the_issuance_as_metadata(w: World) -> None:
    out = w.issuer.issue(caller(TRIAGE), request(target="h" * 300), "r1")
    assert isinstance(out, Issued)
    (mint,) = w.vaults[""].mints
    assert mint["spiffe_id"] == TRIAGE and mint["cls"] == "enrichment"
    assert mint["ttl_seconds"] == 120 and mint["now"] == T0
    assert mint["metadata"] == {"request_id": "r1", "target": "h" * 256,
                                "scope_map_version": w.issuer._maps.current.version,
                                "broker_instance": w.store.instance_id}


def test_the_intent_keeps_the_initiating_event_or_none(w: World) -> None:
    with_event = w.issuer.issue(caller(TRIAGE), request(), "r1")
    without = w.issuer.issue(caller(TRIAGE), CredentialRequest(action_class="enrichment",
                                                               target="host-2"), "r2")
    assert isinstance(with_event, Issued) and isinstance(without, Issued)
    ids = [with_event.credential.accessor, without.credential.accessor]
    assert w.store.initiating_events(ids) == {ids[0]: ("siem", "42")}
    with sqlite3.connect(w.db_path) as db:
        assert db.execute("SELECT request_id, spiffe_id, event_source, event_id FROM "
                          "credentials ORDER BY request_id").fetchall() == [
            ("r1", str(TRIAGE), "siem", "42"), ("r2", str(TRIAGE), "", "")]


def test_each_environment_mints_and_revokes_in_its_own_vault(envs: World) -> None:
    out = envs.issuer.issue(caller(TRIAGE), request(environment="lab"), "r1")
    assert isinstance(out, Issued) and out.environment == "lab"
    assert [len(v.mints) for v in envs.vaults.values()] == [0, 1]  # prod, lab
    row = envs.store.get(out.credential.accessor)
    assert row is not None and row.environment == "lab"
    envs.issuer.revoke_unrecorded(out.credential.accessor, "r1", "test", "lab")
    assert envs.vaults["lab"].revokes == [(out.credential.accessor, False)]
    assert envs.vaults["prod"].revokes == []
    (rec,) = envs.records("credential.revoked")
    assert rec["environment"] == "lab"


def test_a_request_naming_no_environment_is_recorded_in_the_default_one(envs: World) -> None:
    out = envs.issuer.issue(caller(TRIAGE), request(), "r1")
    assert isinstance(out, Issued) and out.environment == "prod"
    assert [len(v.mints) for v in envs.vaults.values()] == [1, 0]
    with sqlite3.connect(envs.db_path) as db:
        assert db.execute("SELECT environment FROM credentials").fetchall() == [("prod",)]


def test_before_vault_holds_the_map_the_agent_reads_why_and_what_to_do(w: World) -> None:
    w.issuer._maps.vault_synced = False  # type: ignore[misc]
    with pytest.raises(VaultUnavailableError) as err:
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert str(err.value) == (
        "the broker has not yet brought Vault in line with its scope map (Vault was "
        "unreachable at start-up); it retries, try again shortly")


def test_a_mint_vault_refuses_forgets_its_intent(w: World) -> None:
    w.vaults[""].fail_mint = VaultError("bad request (test)")
    with pytest.raises(VaultError):
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert w.store.intents() == []
    with sqlite3.connect(w.db_path) as db:
        assert db.execute("SELECT count(*) FROM credentials").fetchone() == (0,)


def test_break_glass_mints_without_a_waiting_decision_write_and_caps_the_ttl(w: World) -> None:
    out = w.issuer.issue(caller(CONTAINMENT), request("revoke.tokens"), "r1", break_glass=True)
    assert isinstance(out, Issued) and out.approval is not None
    assert out.approval.break_glass is not None
    (mint,) = w.vaults[""].mints
    assert mint["ttl_seconds"] == 30  # break_glass.max_ttl, below the class's 1m
    (decision,) = w.records("decision")
    assert decision["break_glass"] is True and decision["request_id"] == "r1"


# -- a credential that cannot be handed out


def test_a_revoked_unrecorded_credential_is_recorded_and_audited_exactly(w: World) -> None:
    w.audit.fail = "credential.minted"
    with pytest.raises(AuditError):
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert w.vaults[""].revokes == [("acc-1", False)]  # unchecked: it was minted just now
    assert w.revoked_columns("acc-1") == ("revoked", T0.timestamp(), "credbroker",
                                          "the audit log could not record it", "unrecorded",
                                          0, "")
    assert w.records("credential.revoked") == [{
        "type": "credential.revoked", "credential_id": "acc-1", "request_id": "r1",
        "by": "credbroker", "selector": "unrecorded",
        "reason": "the audit log could not record it"}]


def test_an_unconfirmed_revocation_is_queued_with_vaults_error_and_said_so(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    w.audit.fail = "credential.minted"
    w.vaults[""].fail_revoke = VaultUnavailableError("Vault is unreachable (test)")
    with caplog.at_level(logging.ERROR, logger="credbroker.broker"), \
            pytest.raises(AuditError):
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert w.revoked_columns("acc-1") == ("revoked", T0.timestamp(), "credbroker",
                                          "the audit log could not record it", "unrecorded",
                                          1, "Vault is unreachable (test)")
    assert ("request_id=r1 credential_id=acc-1 (the audit log could not record it): Vault "
            "did not confirm its revocation; the registry retries it where it holds its row, "
            "and the reconcile scan of Vault finds it otherwise") in caplog.messages


def test_a_credential_neither_revoked_nor_queued_tells_the_operator_to_revoke_it_by_hand(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    w.audit.fail = "credential.minted"
    w.vaults[""].fail_revoke = VaultUnavailableError("Vault is unreachable (test)")
    w.store.fail = "mark_revoked"
    with caplog.at_level(logging.ERROR, logger="credbroker.broker"), \
            pytest.raises(AuditError):
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert [r.getMessage() for r in critical] == [
        "request_id=r1 credential_id=acc-1 (the audit log could not record it) could not be "
        "revoked (Vault is unreachable (test)) nor queued (the registry could not be written "
        "(test)): revoke it by hand"]


def test_a_revocation_the_registry_cannot_record_is_still_audited_and_logged(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    w.audit.fail = "credential.minted"
    w.store.fail = "mark_revoked"
    with caplog.at_level(logging.WARNING, logger="credbroker.broker"), \
            pytest.raises(AuditError):
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert "acc-1" not in w.vaults[""].live
    assert [r["credential_id"] for r in w.records("credential.revoked")] == ["acc-1"]
    assert ("credential_id=acc-1 revoked, but the registry did not record it: the registry "
            "could not be written (test)") in caplog.messages
    assert ("request_id=r1 credential_id=acc-1 revoked: the audit log could not record it"
            in caplog.messages)


# -- denials and automatic freezes


def test_a_denial_says_its_code_and_is_counted_per_class(w: World) -> None:
    with pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(TRIAGE), request("spend.once"), "r1")  # triage is not listed
    code = denied.value.decision.deny_code
    assert code is not None and str(denied.value) == code.value
    assert w.sample("credbroker_denials_total", action_class="spend.once",
                    code=code.value) == 1
    with pytest.raises(DeniedByPolicy) as unknown:
        w.issuer.issue(caller(TRIAGE), request("no.such.class"), "r2")
    code = unknown.value.decision.deny_code
    assert code is not None
    assert w.sample("credbroker_denials_total", action_class="(unknown)", code=code.value) == 1
    assert w.store.freezes() == []


def test_spending_past_an_on_exceed_freeze_budget_freezes_the_identity(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    me = str(CONTAINMENT)
    assert isinstance(w.issuer.issue(caller(CONTAINMENT), request("spend.once"), "r1"), Issued)
    with caplog.at_level(logging.WARNING, logger="credbroker.broker"), \
            pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(CONTAINMENT), request("spend.once"), "r2")
    rule = "spend.once.limits.on_exceed"
    decision = denied.value.decision
    assert decision.reasons[-1] == (f"{me} is now frozen by the broker (rule {rule}); only "
                                    "a person may lift it")
    (fz,) = w.store.freezes()
    assert (fz.kind, fz.pattern, fz.by) == ("spiffe_id", me, "credbroker")
    assert fz.reason == f"automatic freeze, rule {rule}: {decision.reasons[0]}"
    (rec,) = w.records("freeze")
    assert rec["rule"] == rule and rec["by"] == "credbroker" and rec["reason"] == fz.reason
    assert rec["actor"] == {"kind": "credbroker", "rule": rule, "request_id": "r2"}
    assert w.hook.next() == {
        "event": "freeze.automatic", "freeze_id": fz.id, "spiffe_id": me, "rule": rule,
        "reason": decision.reasons[0], "notify": ["ir-oncall", "incident-commander"],
        "action_class": "spend.once", "owner_team": "incident-response", "request_id": "r2",
        "credentials_matched": 1, "vault_pending": False}
    assert w.sample("credbroker_automatic_freezes_total", action_class="spend.once",
                    rule="on_exceed") == 1
    assert any(re.fullmatch(
        rf"request_id=r2 {re.escape(me)} FROZEN by the broker: rule {re.escape(rule)} fired "
        rf"\({re.escape(decision.reasons[0])}\); Vault enforced in \d+\.\d ms", m)
        for m in caplog.messages), caplog.messages


def test_a_freeze_vault_cannot_enforce_yet_is_said_pending(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    def unreachable(spiffe_id: str) -> str:
        raise VaultUnavailableError("Vault is unreachable (test)")

    w.vaults[""].entity_of = unreachable  # type: ignore[attr-defined]
    assert isinstance(w.issuer.issue(caller(CONTAINMENT), request("spend.once"), "r1"), Issued)
    with caplog.at_level(logging.WARNING, logger="credbroker.broker"), \
            pytest.raises(DeniedByPolicy):
        w.issuer.issue(caller(CONTAINMENT), request("spend.once"), "r2")
    assert w.hook.next()["vault_pending"] is True
    assert any(m.startswith(f"request_id=r2 {CONTAINMENT} FROZEN by the broker: rule ")
               and m.endswith("; Vault enforcement PENDING") for m in caplog.messages)


def test_repeated_denials_freeze_once_and_a_lifted_freeze_starts_counting_afresh(
        w: World) -> None:
    me = str(TRIAGE)
    rule = "lookup.limits.denials"
    with pytest.raises(DeniedByPolicy) as first:
        w.issuer.issue(caller(TRIAGE), request("lookup", target="bad-1"), "r1")
    assert "now frozen" not in first.value.decision.reasons[-1]
    assert w.store.freezes() == []
    with pytest.raises(DeniedByPolicy) as second:
        w.issuer.issue(caller(TRIAGE), request("lookup", target="bad-2"), "r2")
    assert second.value.decision.reasons[-1] == (
        f"{me} is now frozen by the broker (rule {rule}); only a person may lift it")
    (fz,) = w.store.freezes()
    assert fz.reason.startswith(f"automatic freeze, rule {rule}: {me} was denied lookup 2 "
                                "times within 300s")
    post = w.hook.next()
    assert post["notify"] == ["soc-oncall", "soc-manager"] and post["rule"] == rule
    assert w.sample("credbroker_automatic_freezes_total", action_class="lookup",
                    rule="denials") == 1
    # Lifted by a person: the denials before the freeze no longer count.
    w.responder.unfreeze(spiffe_id=me, action_class="", reason="checked", by="alice@example.org",
                         actor={"kind": "person", "subject": "alice@example.org"})
    with pytest.raises(DeniedByPolicy) as after:
        w.issuer.issue(caller(TRIAGE), request("lookup", target="bad-3"), "r3")
    assert "now frozen" not in after.value.decision.reasons[-1]
    assert w.store.freezes() == []


def test_an_automatic_freeze_that_cannot_be_recorded_leaves_the_denial_standing(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    w.store.fail = "add_freeze"
    assert isinstance(w.issuer.issue(caller(CONTAINMENT), request("spend.once"), "r1"), Issued)
    with caplog.at_level(logging.ERROR, logger="credbroker.broker"), \
            pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(CONTAINMENT), request("spend.once"), "r2")
    assert "now frozen" not in denied.value.decision.reasons[-1]
    assert (f"request_id=r2 automatic freeze of {CONTAINMENT} (rule "
            "spend.once.limits.on_exceed) failed: the registry could not be written (test)"
            in caplog.messages)
    assert w.sample("credbroker_automatic_freezes_total", action_class="spend.once",
                    rule="on_exceed") == 0


def test_two_requests_tripping_at_once_freeze_the_identity_once(w: World) -> None:
    cls = w.issuer._maps.current.classes["lookup"]
    trip = Trip(rule="lookup.limits.denials", reason="denied twice")
    assert w.issuer._auto_freeze(TRIAGE, cls, trip, "r1") is True
    assert w.issuer._auto_freeze(TRIAGE, cls, trip, "r2") is False  # the other one's freeze
    assert len(w.store.freezes()) == 1
    # Another identity's freeze, or a class freeze, is no reason to skip.
    assert w.issuer._auto_freeze(CONTAINMENT, cls, trip, "r3") is True
    assert len(w.store.freezes()) == 2


def test_a_denial_exactly_one_window_old_no_longer_counts() -> None:
    c = DenialCounter()
    window = timedelta(minutes=5)
    c.add(("a", "x"), T0, window)
    assert c.add(("a", "x"), T0 + window, window) == (T0 + window,)


# -- self-freeze


def test_a_workload_freezes_itself_once_on_the_record(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    me = str(CONTAINMENT)
    with caplog.at_level(logging.WARNING, logger="credbroker.broker"):
        done = w.issuer.freeze_self(caller(CONTAINMENT), "I was told to " + "x" * 300)
    assert done.result is not None and done.existing is None
    fz = done.result.freeze
    assert (fz.kind, fz.pattern, fz.by) == ("spiffe_id", me, f"self:{me}")
    assert w.store.freezes() == [fz]
    (rec,) = w.records("freeze")
    assert rec["rule"] == "self" and rec["by"] == f"self:{me}"
    assert rec["actor"] == {"kind": "self", "client": me, "x509_serial": "0a1b",
                            "jwt_id": "jti-7"}
    # Every class it may use (by name): their escalation paths, each once.
    assert w.hook.next() == {
        "event": "freeze.self", "freeze_id": fz.id, "spiffe_id": me, "rule": "self",
        "reason": "I was told to " + "x" * 300,
        "notify": ["soc-oncall", "soc-manager", "iam-oncall", "ir-oncall",
                   "incident-commander"],
        "action_classes": ["enrichment", "lookup", "revoke.tokens", "spend.once"],
        "credentials_matched": 0, "vault_pending": False}
    assert w.sample("credbroker_self_freezes_total") == 1
    assert any(re.fullmatch(rf"{re.escape(me)} FROZE ITSELF \(Vault enforced in \d+\.\d ms\): "
                            rf"I was told to x{{186}}", m) for m in caplog.messages), \
        caplog.messages
    again = w.issuer.freeze_self(caller(CONTAINMENT), "again")
    assert again.result is None and again.existing == fz
    assert len(w.store.freezes()) == 1 and w.sample("credbroker_self_freezes_total") == 1


def test_a_self_freeze_is_not_satisfied_by_someone_elses_freeze(w: World) -> None:
    me = str(TRIAGE)
    w.responder.freeze(spiffe_id=me, action_class="", reason="rogue", by="alice@example.org")
    w.responder.freeze(spiffe_id=str(CONTAINMENT), action_class="", reason="rogue",
                       by=f"self:{me}")
    done = w.issuer.freeze_self(caller(TRIAGE), "stop me")
    assert done.result is not None and done.result.freeze.by == f"self:{me}"
    assert len(w.store.freezes()) == 3
    post = w.hook.next()
    assert post["event"] == "freeze.self" and post["notify"] == ["soc-oncall", "soc-manager"]
    assert post["action_classes"] == ["enrichment", "lookup"]


def test_a_self_freeze_vault_cannot_enforce_yet_says_pending(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    def unreachable(spiffe_id: str) -> str:
        raise VaultUnavailableError("Vault is unreachable (test)")

    w.vaults[""].entity_of = unreachable  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="credbroker.broker"):
        done = w.issuer.freeze_self(caller(TRIAGE), "stop me")
    assert done.result is not None and done.result.vault_pending
    assert f"{TRIAGE} FROZE ITSELF (Vault enforcement PENDING): stop me" in caplog.messages
    assert w.hook.next()["vault_pending"] is True


# -- the decision's record, the answer, the budget


LEAD = Approver(subject="lead@example.org", groups=("ir-leads",), via="oidc")


def budget_used(w: World, spiffe_id: SpiffeId, cls: str) -> int:
    with w.store.budget_hold(str(spiffe_id), cls, T0, timedelta(days=1)) as hold:
        return len(hold.recent)


def test_the_decision_record_holds_who_asked_how_it_was_proven_and_for_which_environment(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    later = T0 + timedelta(seconds=7)
    for w in _world(tmp_path, ("prod", "lab"), decided_at=later):
        with caplog.at_level(logging.INFO, logger="credbroker.broker"):
            out = w.issuer.issue(caller(TRIAGE), request(environment="lab"), "r1")
        assert isinstance(out, Issued) and out.decision.outcome is Outcome.ALLOW
        (raw,) = [r for r in read_records(w.audit_path) if r["type"] == "decision"]
        assert raw["time"] == "2026-11-28T12:00:00Z"  # when it was written, by the log's clock
        (rec,) = w.records("decision")
        assert set(rec) == {"type", "request_id", "spiffe_id", "request", "decision",
                            "environment", "proof", "approvers", "approval_id",
                            "approval_refused", "break_glass"}
        assert (rec["request_id"], rec["spiffe_id"], rec["environment"]) == (
            "r1", str(TRIAGE), "lab")
        assert rec["proof"] == {"x509_serial": "0a1b", "jwt_id": "jti-7"}
        assert (rec["approvers"], rec["approval_id"], rec["approval_refused"],
                rec["break_glass"]) == ([], "", "", False)
        version = w.issuer._maps.current.version
        assert (f"request_id=r1 spiffe_id={TRIAGE} action_class=enrichment environment=lab "
                f"outcome=allow rule={out.decision.rule} scope_map={version[:19]}"
                in caplog.messages)
        assert w.sample("credbroker_issuance_total", action_class="enrichment",
                        outcome="allow") == 1


def test_a_request_for_an_unknown_class_is_counted_as_one_label(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="credbroker.broker"), \
            pytest.raises(DeniedByPolicy):
        w.issuer.issue(caller(TRIAGE), request("no.such.class"), "r1")
    assert w.sample("credbroker_issuance_total", action_class="(unknown)", outcome="deny") == 1
    assert any(m.startswith(f"request_id=r1 spiffe_id={TRIAGE} action_class=no.such.class "
                            "outcome=deny rule=") for m in caplog.messages), caplog.messages


def test_a_denied_request_carrying_an_approval_id_is_answered_with_the_denial(
        w: World) -> None:
    with pytest.raises(DeniedByPolicy):
        w.issuer.issue(caller(TRIAGE), request("revoke.tokens"), "r1", approval_id="nope")
    (rec,) = w.records("decision")
    assert rec["approval_refused"] == "" and rec["approval_id"] == "nope"


def test_a_decision_that_cannot_be_recorded_is_never_answered(w: World) -> None:
    w.audit.fail = "decision"
    with pytest.raises(AuditError):  # not the denial: it is not on record
        w.issuer.issue(caller(TRIAGE), request("spend.once"), "r1")
    with pytest.raises(AuditError):  # not "pending": nobody would know it was asked
        w.issuer.issue(caller(CONTAINMENT), request("revoke.tokens"), "r2")
    assert w.desk.pending() == []
    with pytest.raises(AuditError):  # not the refused approval
        w.issuer.issue(caller(CONTAINMENT), request("revoke.tokens"), "r3", approval_id="nope")
    with pytest.raises(AuditError):  # allowed, but the approval named is refused: not that
        w.issuer.issue(caller(TRIAGE), request(), "r4", approval_id="nope")


def test_a_pending_approval_holds_no_budget_slot_and_the_approved_mint_takes_one(
        w: World) -> None:
    req = request("revoke.tokens")
    pending = w.issuer.issue(caller(CONTAINMENT), req, "r1")
    assert isinstance(pending, PendingApproval)
    assert pending.decision.outcome is Outcome.NEEDS_APPROVAL
    assert (pending.approval.request_id, pending.approval.spiffe_id,
            pending.approval.action_class) == ("r1", str(CONTAINMENT), "revoke.tokens")
    assert budget_used(w, CONTAINMENT, "revoke.tokens") == 0
    w.desk.decide(pending.approval.id, LEAD, "checked the ticket", approve=True)
    out = w.issuer.issue(caller(CONTAINMENT), req, "r2", approval_id=pending.approval.id)
    assert isinstance(out, Issued) and out.decision.outcome is Outcome.NEEDS_APPROVAL
    assert budget_used(w, CONTAINMENT, "revoke.tokens") == 1
    approved = w.records("decision")[-1]
    assert approved["approvers"] == ["lead@example.org"]
    assert approved["approval_id"] == pending.approval.id and approved["break_glass"] is False


def test_a_refused_approval_is_on_the_decisions_record(w: World) -> None:
    with pytest.raises(ApprovalError) as refused:
        w.issuer.issue(caller(CONTAINMENT), request("revoke.tokens"), "r1", approval_id="nope")
    (rec,) = w.records("decision")
    assert rec["approval_refused"] == str(refused.value) != ""
    assert w.vaults[""].mints == []


def test_an_approval_used_by_another_request_meanwhile_revokes_the_credential(
        w: World) -> None:
    req = request("revoke.tokens")
    pending = w.issuer.issue(caller(CONTAINMENT), req, "r1")
    assert isinstance(pending, PendingApproval)
    w.desk.decide(pending.approval.id, LEAD, "checked the ticket", approve=True)

    def used_meanwhile() -> None:
        w.vaults[""].on_mint = None
        w.desk.consume(pending.approval.id, str(CONTAINMENT), req)

    w.vaults[""].on_mint = used_meanwhile
    with pytest.raises(ApprovalError):
        w.issuer.issue(caller(CONTAINMENT), req, "r2", approval_id=pending.approval.id)
    assert w.vaults[""].live == {}
    assert w.records("credential.revoked") == [{
        "type": "credential.revoked", "credential_id": "acc-1", "request_id": "r2",
        "by": "credbroker", "selector": "unrecorded",
        "reason": "its approval could not be used"}]


def test_break_glass_opens_its_approval_for_this_request(w: World) -> None:
    out = w.issuer.issue(caller(CONTAINMENT), request("revoke.tokens", target="user-9"), "r1",
                         break_glass=True)
    assert isinstance(out, Issued) and out.approval is not None
    assert (out.approval.request_id, out.approval.spiffe_id, out.approval.action_class,
            out.approval.request.target) == ("r1", str(CONTAINMENT), "revoke.tokens", "user-9")
    assert out.approval.credential_id == "" and out.decision.outcome is Outcome.NEEDS_APPROVAL
    assert w.desk.get(out.approval.id).credential_id == out.credential.accessor


def test_a_federated_caller_is_decided_as_one_and_on_the_record_as_one(w: World) -> None:
    vendor = Caller(spiffe_id=VENDOR, x509_serial="0c", federated_from="vendor.example")
    with pytest.raises(DeniedByPolicy) as denied:  # federated: deny, the default
        w.issuer.issue(vendor, request("vendor.lookup"), "r1")
    assert denied.value.decision.rule == "vendor.lookup.federated"
    out = w.issuer.issue(vendor, request("vendor.enrichment"), "r2")
    assert isinstance(out, Issued)
    assert [r.get("federated_from") for r in w.records("decision")] == ["vendor.example"] * 2
    (minted,) = w.records("credential.minted")
    assert minted["federated_from"] == "vendor.example"


def test_the_minted_record_says_what_vault_issued(envs: World) -> None:
    out = envs.issuer.issue(caller(TRIAGE), request(environment="lab"), "r1")
    assert isinstance(out, Issued)
    assert envs.records("credential.minted") == [{
        "type": "credential.minted", "request_id": "r1", "credential_id": "acc-1",
        "spiffe_id": str(TRIAGE), "action_class": "enrichment", "target": "host-1",
        "policies": ["credbroker-enrichment"], "ttl_seconds": 120,
        "expires_at": "2026-11-28T12:02:00Z", "vault_entity_id": "e-1",
        "scope_map_version": envs.issuer._maps.current.version, "environment": "lab"}]


def test_a_frozen_identity_is_denied_at_the_decision_before_vault_is_asked(w: World) -> None:
    w.responder.freeze(spiffe_id=str(TRIAGE), action_class="", reason="rogue",
                       by="alice@example.org")
    with pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert denied.value.decision.deny_code is not None
    assert denied.value.decision.deny_code.value == "frozen"
    assert w.vaults[""].mints == [] and w.store.intents() == []


def test_break_glass_asked_for_a_class_that_needs_no_approval_is_not_recorded_as_used(
        w: World) -> None:
    out = w.issuer.issue(caller(TRIAGE), request(), "r1", break_glass=True)
    assert isinstance(out, Issued) and out.approval is None
    (rec,) = w.records("decision")
    assert rec["break_glass"] is False


def test_a_minted_credential_is_logged_recorded_with_its_lease_prefix_and_not_tagged(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="credbroker.broker"):
        out = w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert isinstance(out, Issued)
    assert ("request_id=r1 minted credential_id=acc-1 ttl=120s policies=credbroker-enrichment"
            in caplog.messages)
    row = w.store.get("acc-1")
    assert row is not None and row.lease_prefix == "auth/token/create/credbroker-enrichment/"
    (minted,) = w.records("credential.minted")
    assert "environment" not in minted and "federated_from" not in minted


def test_a_credential_minted_in_an_environment_is_logged_and_revoked_there(
        envs: World, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="credbroker.broker"):
        envs.issuer.issue(caller(TRIAGE), request(environment="lab"), "r1")
    assert ("request_id=r1 minted credential_id=acc-1 ttl=120s policies=credbroker-enrichment "
            "environment=lab" in caplog.messages)
    envs.audit.fail = "credential.minted"
    with pytest.raises(AuditError):
        envs.issuer.issue(caller(TRIAGE), request(environment="lab"), "r2")
    assert envs.vaults["lab"].revokes == [("acc-2", False)] and envs.vaults["prod"].revokes == []


def test_when_registry_and_audit_log_both_fail_the_registry_is_the_reason(w: World) -> None:
    w.store.fail = "record_minted"
    w.audit.fail = "credential.minted"
    with pytest.raises(StoreError):
        w.issuer.issue(caller(TRIAGE), request(), "r1")
    assert w.vaults[""].revokes == [("acc-1", False)]
    (rec,) = w.records("credential.revoked")
    assert rec["reason"] == "the registry could not record it"


def test_a_class_frozen_while_minting_revokes_the_credential_in_its_environment(
        envs: World) -> None:
    def frozen_meanwhile() -> None:
        envs.vaults["lab"].on_mint = None
        envs.responder.freeze(spiffe_id="", action_class="enrichment", reason="leak",
                              by="alice@example.org")

    envs.vaults["lab"].on_mint = frozen_meanwhile
    with pytest.raises(FrozenError) as err:
        envs.issuer.issue(caller(TRIAGE), request(environment="lab"), "r1")
    (fz,) = envs.store.freezes()
    assert str(err.value) == (f"{fz.describe()}; the credential minted meanwhile was revoked")
    assert envs.vaults["lab"].revokes == [("acc-1", False)]
    assert envs.records("credential.revoked") == [{
        "type": "credential.revoked", "credential_id": "acc-1", "request_id": "r1",
        "by": "credbroker", "selector": "unrecorded",
        "reason": f"frozen while it was minted: {fz.describe()}", "environment": "lab"}]


def test_an_approval_used_meanwhile_is_revoked_in_its_environment(envs: World) -> None:
    req = request("revoke.tokens", environment="lab")
    pending = envs.issuer.issue(caller(CONTAINMENT), req, "r1")
    assert isinstance(pending, PendingApproval)
    envs.desk.decide(pending.approval.id, LEAD, "checked the ticket", approve=True)

    def used_meanwhile() -> None:
        envs.vaults["lab"].on_mint = None
        envs.desk.consume(pending.approval.id, str(CONTAINMENT), pending.approval.request)

    envs.vaults["lab"].on_mint = used_meanwhile
    with pytest.raises(ApprovalError):
        envs.issuer.issue(caller(CONTAINMENT), req, "r2", approval_id=pending.approval.id)
    assert envs.vaults["lab"].revokes == [("acc-1", False)] and envs.vaults["prod"].revokes == []


def test_denials_of_a_frozen_identity_do_not_count_towards_the_next_freeze(w: World) -> None:
    me = str(TRIAGE)
    w.responder.freeze(spiffe_id=me, action_class="", reason="rogue", by="alice@example.org")
    for n in range(2):  # denied as frozen: not a denial that limits.denials counts
        with pytest.raises(DeniedByPolicy):
            w.issuer.issue(caller(TRIAGE), request("lookup", target=f"bad-{n}"), f"r{n}")
    w.responder.unfreeze(spiffe_id=me, action_class="", reason="checked", by="alice@example.org")
    with pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(TRIAGE), request("lookup", target="bad-2"), "r2")
    assert "now frozen" not in denied.value.decision.reasons[-1]
    assert w.store.freezes() == []
