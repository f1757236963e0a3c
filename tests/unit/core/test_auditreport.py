"""The governance report counts exactly what a recorded log holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.audit import AuditLog, read_records
from broker.core.auditreport import build_report, to_html, to_json, to_markdown

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"
CONT = "spiffe://example.org/agent/containment"


def decision(t: datetime, sid: str, cls: str, outcome: str, code: str | None = None,
             team: str = "soc-platform") -> dict[str, Any]:
    return {"type": "decision", "time": t.isoformat(), "spiffe_id": sid, "request_id": "r",
            "request": {"action_class": cls},
            "decision": {"outcome": outcome, "deny_code": code, "action_class": cls,
                         "owner": {"team": team, "contact": "x@example.org"}}}


def recorded() -> list[dict[str, Any]]:
    """A week of a small SOC: known counts, in log order."""
    t = T0
    r: list[dict[str, Any]] = []
    for i in range(5):  # 5 enrichment issuances
        r.append(decision(t + timedelta(minutes=i), TRIAGE, "enrichment", "allow"))
        r.append({"type": "credential.minted", "time": (t + timedelta(minutes=i)).isoformat(),
                  "action_class": "enrichment", "spiffe_id": TRIAGE})
    r.append({"type": "credential.reused", "time": (t + timedelta(minutes=6)).isoformat(),
              "action_class": "enrichment"})
    for code in ("workload_not_allowed", "workload_not_allowed", "condition_false"):
        r.append(decision(t + timedelta(minutes=7), TRIAGE, "containment.isolate_host", "deny",
                          code, team="incident-response"))
    # approval 1: requested, approved by alice in 10 s (rubber stamp), used
    r.append(decision(t + timedelta(hours=1), CONT, "containment.isolate_host",
                      "needs_approval", team="incident-response"))
    r.append({"type": "approval.requested", "time": (t + timedelta(hours=1)).isoformat(),
              "approval_id": "apr-1", "action_class": "containment.isolate_host",
              "spiffe_id": CONT, "state": "pending"})
    r.append({"type": "approval.approved",
              "time": (t + timedelta(hours=1, seconds=10)).isoformat(), "approval_id": "apr-1",
              "action_class": "containment.isolate_host", "spiffe_id": CONT,
              "approver": "alice@example.org", "state": "approved"})
    r.append({"type": "credential.minted", "time": (t + timedelta(hours=1, seconds=11))
              .isoformat(), "action_class": "containment.isolate_host", "spiffe_id": CONT})
    # approval 2: denied by bob after 4 minutes
    r.append({"type": "approval.requested", "time": (t + timedelta(hours=2)).isoformat(),
              "approval_id": "apr-2", "action_class": "containment.isolate_host",
              "spiffe_id": CONT, "state": "pending"})
    r.append({"type": "approval.denied", "time": (t + timedelta(hours=2, minutes=4))
              .isoformat(), "approval_id": "apr-2", "action_class": "containment.isolate_host",
              "spiffe_id": CONT, "approver": "bob@example.org", "state": "denied"})
    # two break-glass uses, one reviewed; one refused
    for n, aid in enumerate(("bg-1", "bg-2")):
        r.append({"type": "approval.break_glass", "time": (t + timedelta(hours=3 + n))
                  .isoformat(), "approval_id": aid, "action_class": "containment.isolate_host",
                  "spiffe_id": CONT})
    r.append({"type": "approval.break_glass_refused", "time": (t + timedelta(hours=3, minutes=1))
              .isoformat(), "action_class": "containment.isolate_host", "spiffe_id": CONT})
    r.append({"type": "approval.reviewed", "time": (t + timedelta(hours=5)).isoformat(),
              "approval_id": "bg-1", "action_class": "containment.isolate_host"})
    # a class freeze lifted by alice, an identity freeze still in force
    r.append({"type": "freeze", "time": (t + timedelta(hours=6)).isoformat(),
              "kind": "action_class", "pattern": "enrichment", "by": "dave@example.org",
              "reason": "feed poisoned"})
    r.append({"type": "unfreeze", "time": (t + timedelta(hours=7)).isoformat(),
              "kind": "action_class", "pattern": "enrichment", "by": "alice@example.org",
              "reason": "feed clean"})
    r.append({"type": "freeze", "time": (t + timedelta(hours=8)).isoformat(),
              "kind": "spiffe_id", "pattern": CONT, "by": "credbroker", "reason": "budget"})
    return r


def test_counts_match_the_log() -> None:
    rep = build_report(recorded())
    e, c = rep.classes["enrichment"], rep.classes["containment.isolate_host"]
    assert (e.owner, e.issued, e.reused, e.allowed, e.denied, e.freezes) == (
        "soc-platform", 5, 1, 5, 0, 1)
    assert (c.owner, c.issued, c.denied, c.needed_approval) == ("incident-response", 1, 3, 1)
    assert dict(c.denials_by_code) == {"workload_not_allowed": 2, "condition_false": 1}
    assert [(a.approval_id, a.outcome, a.decided_by, a.seconds) for a in c.approvals] == [
        ("apr-1", "approved", "alice@example.org", 10.0),
        ("apr-2", "denied", "bob@example.org", 240.0)]
    assert (c.break_glass_uses, c.break_glass_refused, c.break_glass_unreviewed) == (
        2, 1, ["bg-2"])
    assert [a.approval_id for a in rep.rubber_stamped()] == ["apr-1"]
    assert [(f.pattern, f.lifted_by) for f in rep.freezes] == [
        ("enrichment", "alice@example.org"), (CONT, "")]
    assert rep.denials_by_identity == {TRIAGE: 3}
    assert list(rep.by_owner()) == ["incident-response", "soc-platform"]


def test_the_window_counts_only_its_records_but_keeps_real_approval_latency() -> None:
    since = T0 + timedelta(hours=1, seconds=5)  # after apr-1 was requested, before it was decided
    rep = build_report(recorded(), since=since, until=T0 + timedelta(hours=2, minutes=5))
    c = rep.classes["containment.isolate_host"]
    assert [(a.approval_id, a.seconds) for a in c.approvals] == [("apr-1", 10.0),
                                                                 ("apr-2", 240.0)]
    assert "enrichment" not in rep.classes and c.needed_approval == 0 and c.issued == 1
    assert rep.rubber_stamped()[0].approval_id == "apr-1"


def test_renderings_say_the_same() -> None:
    rep = build_report(recorded(), rubber_stamp_seconds=5)
    assert rep.rubber_stamped() == []  # 10 s is not under 5 s
    md = to_markdown(rep)
    assert "## Owner: incident-response" in md and "awaiting review: bg-2" in md
    assert "lifted by alice@example.org" in md and "still in force" in md
    assert "apr-1 approved by alice@example.org in 10s" in md
    page = to_html(rep)
    assert page.count("<svg") == 3 and "<script" not in page
    assert json.loads(json.dumps(to_json(rep)))["owners"]["soc-platform"][0]["issued"] == 5


def test_the_cli_reports_a_recorded_log(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from broker.cli.main import main

    log = AuditLog(tmp_path / "audit.log")
    for r in recorded():
        fields = {k: v for k, v in r.items() if k not in ("type", "time")}
        log.append(r["type"], **fields)
    log.close()
    path = str(tmp_path / "audit.log")
    assert len(list(read_records(tmp_path / "audit.log"))) == len(recorded())
    # the records carry the time they were appended (now): the default window, 7d, has them
    assert main(["audit", "report", "--log", path, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    enrichment = out["owners"]["soc-platform"][0]
    assert (enrichment["issued"], enrichment["reused"]) == (5, 1)
    assert out["denials_by_identity"] == {TRIAGE: 3}
    assert main(["audit", "report", "--log", path, "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
    assert main(["audit", "report", "--log", path, "--format", "html"]) == 0
    assert capsys.readouterr().out.startswith("<!doctype html>")
