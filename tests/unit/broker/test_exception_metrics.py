"""Exceptions are watched: approval latency and fast approvals per class, break-glass uses,
and the denial counter behind ``limits.denials``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.adapters.approvers import ApproverConfig
from broker.adapters.audit import AuditLog
from broker.adapters.registry import SqliteStore
from broker.app.approval_desk import ApprovalDesk
from broker.app.issuance import DenialCounter
from broker.core.approvals import Approver
from broker.core.models import CredentialRequest, InitiatingEvent
from broker.core.scopemap import parse_scope_map
from broker.grpc.observability import Metrics

MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  identity.revoke_tokens:
    risk: destructive
    owner: {team: iam, contact: iam@example.org}
    escalation: [iam-oncall]
    workloads: [spiffe://example.org/agent/a]
    approval:
      mode: jit
      approvers: [ir-leads]
      break_glass: {allowed: true, reviewers: [ir-leads], limit: 5/h}
    credential:
      ttl: 1m
      max_ttl: 2m
      vault_policy:
        - path: secret/data/x/*
          capabilities: [read]
"""
AGENT = "spiffe://example.org/agent/a"
LEAD = Approver(subject="lead@example.org", groups=("ir-leads",), via="oidc")


def _sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_approval_latency_fast_approvals_and_break_glass_are_counted(tmp_path: Path) -> None:
    now = [datetime(2026, 11, 28, 12, 0, tzinfo=UTC)]
    store = SqliteStore(tmp_path / "r.db")
    audit = AuditLog(tmp_path / "a.log")
    desk = ApprovalDesk(store=store, audit=audit, config=ApproverConfig(fast_approval_seconds=30),
                        clock=lambda: now[0])
    desk.metrics = m = Metrics()
    cls = parse_scope_map([("m.yaml", MAP)]).classes["identity.revoke_tokens"]
    req = CredentialRequest(action_class=cls.name, target="u",
                            initiating_event=InitiatingEvent(source="s", id="1"),
                            justification="token theft in ticket 9")
    fast = desk.open(request_id="r1", spiffe_id=AGENT, request=req, cls=cls)
    slow = desk.open(request_id="r2", spiffe_id=AGENT, request=req, cls=cls)
    denied = desk.open(request_id="r3", spiffe_id=AGENT, request=req, cls=cls)
    now[0] += timedelta(seconds=4)
    desk.decide(fast.id, LEAD, "ok", approve=True)
    now[0] += timedelta(minutes=5)
    desk.decide(slow.id, LEAD, "checked the ticket", approve=True)
    desk.decide(denied.id, LEAD, "no", approve=False)
    label = {"action_class": cls.name}
    assert _sample(m, "credbroker_approvals_fast_total", **label) == 1
    assert _sample(m, "credbroker_approval_decision_seconds_count", **label,
                   decision="approved") == 2
    assert _sample(m, "credbroker_approval_decision_seconds_sum", **label,
                   decision="approved") == 4 + 304
    assert _sample(m, "credbroker_approval_decision_seconds_count", **label,
                   decision="denied") == 1
    desk.break_glass(request_id="r4", spiffe_id=AGENT, request=req, cls=cls)
    assert _sample(m, "credbroker_break_glass_total", **label) == 1
    desk.close()
    store.close()
    audit.close()


def test_the_denial_counter_keeps_only_its_window_per_identity_and_class() -> None:
    c = DenialCounter()
    t0 = datetime(2026, 11, 28, tzinfo=UTC)
    w = timedelta(minutes=5)
    assert len(c.add((AGENT, "x"), t0, w)) == 1
    assert len(c.add((AGENT, "x"), t0 + timedelta(minutes=1), w)) == 2
    assert len(c.add((AGENT, "y"), t0 + timedelta(minutes=1), w)) == 1
    assert len(c.add((AGENT, "x"), t0 + timedelta(seconds=330), w)) == 2  # t0 left the window
    c.clear(AGENT)
    assert len(c.add((AGENT, "x"), t0 + timedelta(minutes=6), w)) == 1
