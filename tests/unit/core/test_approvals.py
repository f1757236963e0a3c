"""The approval state machine: binding, separation of duties, escalation, expiry, break-glass."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.core import approvals as ap
from broker.core.models import CredentialRequest, InitiatingEvent
from broker.core.scopemap import ApprovalRule, BreakGlass, parse_budget

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
AGENT = "spiffe://example.org/agent/containment"
REQ = CredentialRequest(action_class="containment.isolate_host", target="ws-1",
                        initiating_event=InitiatingEvent(source="splunk", id="N-1"),
                        justification="isolate", ttl_seconds=120)
RULE = ApprovalRule(approvers=("ir-leads",), approvals_required=2, escalate_after_seconds=300,
                    expires_seconds=1800,
                    break_glass=BreakGlass(allowed=True, max_ttl_seconds=60,
                                           reviewers=("ciso-office",)))
ALICE = ap.Approver(subject="alice", groups=("ir-leads",), via="oidc")
BOB = ap.Approver(subject="bob", groups=("ir-leads", "incident-response"), via="oidc")
EVE = ap.Approver(subject="eve", groups=("marketing",), via="oidc")
CISO = ap.Approver(subject="carol", groups=("ciso-office",), via="oidc")


def new() -> ap.Approval:
    return ap.open_approval(approval_id="a1", request_id="r1", spiffe_id=AGENT, request=REQ,
                            rule=RULE, owner_team="incident-response",
                            escalation=("ir-oncall", "incident-commander"), now=T0)


def test_granted_after_enough_distinct_approvers_and_used_once() -> None:
    a = ap.approve(new(), ALICE, "ok", T0)
    assert a.state == ap.PENDING and len(a.votes) == 1
    a = ap.approve(a, BOB, "ok", T0)
    assert a.state == ap.APPROVED
    used = ap.use(a, AGENT, REQ, T0)
    assert used.state == ap.USED
    with pytest.raises(ap.ApprovalError, match="already used"):
        ap.use(used, AGENT, REQ, T0)


@pytest.mark.parametrize("change", [
    {"target": "ws-2"}, {"action_class": "other"}, {"justification": "x"},
    {"ttl_seconds": 60}, {"initiating_event": InitiatingEvent(source="splunk", id="N-2")},
    {"initiating_event": None}, {"spiffe_id": "spiffe://example.org/agent/other"},
])
def test_an_approval_only_releases_the_exact_request(change: dict[str, object]) -> None:
    a = ap.approve(ap.approve(new(), ALICE, "ok", T0), BOB, "ok", T0)
    who = str(change.pop("spiffe_id", AGENT))
    with pytest.raises(ap.ApprovalError, match="different request"):
        ap.use(a, who, replace(REQ, **change), T0)  # type: ignore[arg-type]


def test_separation_of_duties() -> None:
    a = ap.approve(new(), ALICE, "ok", T0)
    with pytest.raises(ap.ApprovalError, match="already approved"):
        ap.approve(a, ALICE, "again", T0)
    with pytest.raises(ap.ApprovalError, match="none of the groups"):
        ap.approve(a, EVE, "ok", T0)
    with pytest.raises(ap.ApprovalError, match="requested this credential"):
        ap.approve(a, ap.Approver(subject=AGENT, groups=("ir-leads",), via="spiffe"), "me", T0)
    with pytest.raises(ap.ApprovalError, match="owner team may not approve"):
        ap.approve(a, BOB, "ok", T0, owner_team_may_approve=False)
    with pytest.raises(ap.ApprovalError, match="reason is required"):
        ap.approve(a, BOB, " ", T0)


def test_denied_and_then_nothing_else() -> None:
    d = ap.deny(new(), ALICE, "not convinced", T0)
    assert d.state == ap.DENIED and d.denial is not None and d.denial.subject == "alice"
    with pytest.raises(ap.ApprovalError, match="not pending"):
        ap.approve(d, BOB, "ok", T0)
    with pytest.raises(ap.ApprovalError, match="is denied, not approved"):
        ap.use(d, AGENT, REQ, T0)


def test_escalates_along_the_path_then_expires() -> None:
    a = new()
    assert ap.tick(a, T0 + timedelta(seconds=299)).approval is a
    t = ap.tick(a, T0 + timedelta(seconds=300))
    assert t.escalate_to == ("ir-oncall",) and t.approval.escalated == 1
    t = ap.tick(t.approval, T0 + timedelta(seconds=900))
    assert t.escalate_to == ("incident-commander",)
    assert ap.tick(t.approval, T0 + timedelta(seconds=1799)).escalate_to == ()
    end = ap.tick(t.approval, T0 + timedelta(seconds=1800))
    assert end.expired and end.approval.state == ap.EXPIRED
    with pytest.raises(ap.ApprovalError, match="expired"):
        ap.approve(new(), ALICE, "late", T0 + timedelta(seconds=1800))


def test_break_glass_and_review() -> None:
    bg = ap.break_glass_issue(approval_id="b1", request_id="r", spiffe_id=AGENT, request=REQ,
                              rule=RULE, owner_team="ir", escalation=(), now=T0)
    assert bg.state == ap.BREAK_GLASS
    with pytest.raises(ap.ApprovalError, match="none of the groups that may review"):
        ap.sign_off(bg, ALICE, "fine", T0)
    done = ap.sign_off(bg, CISO, "justified", T0)
    assert done.state == ap.REVIEWED and done.review is not None
    no_bg = replace(RULE, break_glass=None)
    with pytest.raises(ap.ApprovalError, match="does not allow break-glass"):
        ap.break_glass_issue(approval_id="b2", request_id="r", spiffe_id=AGENT, request=REQ,
                             rule=no_bg, owner_team="ir", escalation=(), now=T0)
    with pytest.raises(ap.ApprovalError, match="justification and an initiating event"):
        ap.break_glass_issue(approval_id="b3", request_id="r", spiffe_id=AGENT,
                             request=replace(REQ, initiating_event=None), rule=RULE,
                             owner_team="ir", escalation=(), now=T0)


def test_break_glass_is_limited_per_window() -> None:
    def issue(now: datetime, recent: tuple[datetime, ...], rule: ap.ApprovalRule = RULE
              ) -> ap.Approval:
        return ap.break_glass_issue(approval_id="b", request_id="r", spiffe_id=AGENT,
                                    request=REQ, rule=rule, owner_team="ir", escalation=(),
                                    now=now, recent_uses=recent)

    assert issue(T0, ()).state == ap.BREAK_GLASS  # default limit 1/h
    with pytest.raises(ap.BreakGlassLimitError, match=r"1 time\(s\).*1/h") as err:
        issue(T0 + timedelta(minutes=59), (T0,))
    assert err.value.code == "break_glass_limited"
    assert err.value.retry_after_seconds == 61
    assert issue(T0 + timedelta(hours=1), (T0,)).state == ap.BREAK_GLASS  # window passed
    assert RULE.break_glass is not None
    three = replace(RULE, break_glass=replace(RULE.break_glass, limit=parse_budget("3/d")))
    assert issue(T0, (T0 - timedelta(hours=2), T0 - timedelta(hours=1)), three)
    with pytest.raises(ap.BreakGlassLimitError):
        issue(T0, (T0 - timedelta(hours=3), T0 - timedelta(hours=2), T0 - timedelta(hours=1)),
              three)


def test_round_trips_through_json() -> None:
    a = ap.approve(new(), ALICE, "ok", T0)
    assert ap.approval_from_json(a.to_json()) == a
