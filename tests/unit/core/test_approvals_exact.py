"""The approval state machine, pinned where mutation testing showed the suite was loose:
the stored request hash, every field of a stored approval, what each vote records, the
exact refusals people read, and the boundaries (expiry instant, break-glass retry)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import timedelta

import pytest

from broker.core import approvals as ap
from broker.core.scopemap import parse_budget
from tests.unit.core.test_approvals import AGENT, ALICE, BOB, CISO, EVE, REQ, RULE, T0, new


def test_the_request_hash_is_stable_across_releases() -> None:
    """Pending approvals are stored with this hash: a broker that computes it differently
    after an upgrade would refuse every approval given before it."""
    assert ap.request_hash(AGENT, REQ) == (
        "sha256:8cbe539192fd52794a8ccbfb675695cc8ac442ff2ffdb2d7d8db43a120c383e7")
    body = {"spiffe_id": AGENT, "action_class": "containment.isolate_host", "target": "ws-1",
            "initiating_event": {"source": "splunk", "id": "N-1", "summary": ""},
            "justification": "isolate", "ttl_seconds": 120}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert ap.request_hash(AGENT, REQ) == (
        "sha256:" + hashlib.sha256(b"credbroker/approval/v1\x00" + canonical).hexdigest())


def test_open_approval_carries_the_ids_and_class_it_was_opened_with() -> None:
    a = new()
    assert (a.id, a.request_id, a.action_class, a.spiffe_id) == (
        "a1", "r1", "containment.isolate_host", AGENT)


def _everything() -> ap.Approval:
    """A stored approval with every optional field set."""
    bg = ap.break_glass_issue(approval_id="b1", request_id="r9", spiffe_id=AGENT, request=REQ,
                              rule=RULE, owner_team="incident-response",
                              escalation=("ir-oncall",), now=T0)
    return replace(ap.sign_off(bg, CISO, "justified", T0 + timedelta(minutes=5)),
                   votes=(ap.Vote(subject="alice", groups=("ir-leads",), via="oidc",
                                  reason="ok", at=T0),),
                   denial=ap.Vote(subject="bob", groups=("ir-leads",), via="spiffe",
                                  reason="no", at=T0 + timedelta(seconds=1)),
                   escalated=1, credential_id="cred-7")


def test_every_field_survives_the_store() -> None:
    a = _everything()
    d = a.to_json()
    assert d["denial"] == {"subject": "bob", "groups": ["ir-leads"], "via": "spiffe",
                           "reason": "no", "at": "2026-11-27T12:00:01Z"}
    assert d["review"]["subject"] == "carol" and d["review"]["reason"] == "justified"
    assert d["break_glass"] == {"allowed": True, "max_ttl_seconds": 60,
                                "reviewers": ["ciso-office"]}
    assert d["credential_id"] == "cred-7"
    back = ap.approval_from_json(json.loads(json.dumps(d)))
    assert back == a
    assert back.state == ap.REVIEWED and back.denial == a.denial and back.review == a.review


def test_an_approval_without_optional_fields_stores_them_as_absent() -> None:
    a = new()
    d = a.to_json()
    assert d["denial"] is None and d["review"] is None and d["break_glass"] is not None
    plain = replace(a, break_glass=None)
    assert plain.to_json()["break_glass"] is None
    assert ap.approval_from_json(plain.to_json()) == plain
    legacy = {k: v for k, v in a.to_json().items() if k != "credential_id"}
    assert ap.approval_from_json(legacy).credential_id == ""


def test_a_malformed_stored_request_names_where_it_came_from() -> None:
    d = new().to_json()
    d["request"] = {"action_class": 7}
    with pytest.raises(Exception, match="stored approval"):
        ap.approval_from_json(d)


def test_votes_and_denials_record_who_how_why_and_when() -> None:
    a = ap.approve(new(), ALICE, "looks right", T0 + timedelta(seconds=3))
    assert a.votes[-1] == ap.Vote(subject="alice", groups=("ir-leads",), via="oidc",
                                  reason="looks right", at=T0 + timedelta(seconds=3))
    # The owner team may always deny, even where it may not approve.
    d = ap.deny(new(), BOB, "wrong host", T0 + timedelta(seconds=4))
    assert d.denial == ap.Vote(subject="bob", groups=("ir-leads", "incident-response"),
                               via="oidc", reason="wrong host", at=T0 + timedelta(seconds=4))


def test_the_refusals_people_read() -> None:
    a = new()
    cases = [
        (lambda: ap.approve(a, ap.Approver(subject=AGENT, groups=("ir-leads",), via="spiffe"),
                            "me", T0),
         f"{AGENT} requested this credential and cannot approve it (separation of duties)"),
        (lambda: ap.approve(a, EVE, "ok", T0),
         "eve is in none of the groups that may approve containment.isolate_host (ir-leads); "
         "their groups: marketing"),
        (lambda: ap.deny(a, ap.Approver(subject="x", groups=(), via="oidc"), "no", T0),
         "x is in none of the groups that may deny containment.isolate_host (ir-leads); "
         "their groups: none"),
        (lambda: ap.approve(a, replace(BOB, groups=("ir-leads", "incident-response", "sre")),
                            "ok", T0, owner_team_may_approve=False),
         "bob is in incident-response, the team that owns containment.isolate_host; the owner "
         "team may not approve its own agents' requests (configured)"),
        (lambda: ap.approve(a, BOB, " ", T0), "a reason is required: it goes into the audit log"),
        (lambda: ap.deny(a, BOB, "", T0), "a reason is required: it goes into the audit log"),
        (lambda: ap.use(replace(a, state=ap.USED), AGENT, REQ, T0),
         "approval a1 was already used; an approval releases one credential"),
        (lambda: ap.use(replace(a, state=ap.APPROVED), AGENT, REQ, a.expires_at),
         "approval a1 expired at 2026-11-27T12:30:00Z"),
        (lambda: ap.use(replace(a, state=ap.APPROVED), AGENT, replace(REQ, target="x"), T0),
         "approval a1 was given for a different request (identity, class, target, initiating "
         "event, justification or TTL differ); ask for approval of this one"),
        (lambda: ap.break_glass_issue(approval_id="b", request_id="r", spiffe_id=AGENT,
                                      request=REQ, rule=replace(RULE, break_glass=None),
                                      owner_team="ir", escalation=(), now=T0),
         "containment.isolate_host does not allow break-glass; ask for approval instead"),
        (lambda: ap.break_glass_issue(approval_id="b", request_id="r", spiffe_id=AGENT,
                                      request=replace(REQ, justification=" "), rule=RULE,
                                      owner_team="ir", escalation=(), now=T0),
         "break-glass needs a justification and an initiating event"),
    ]
    for call, message in cases:
        with pytest.raises(ap.ApprovalError) as err:
            call()
        assert str(err.value) == message


def test_an_approval_is_spent_at_the_instant_it_expires() -> None:
    granted = replace(new(), state=ap.APPROVED)
    with pytest.raises(ap.ApprovalError, match="expired"):
        ap.use(granted, AGENT, REQ, granted.expires_at)
    assert ap.use(granted, AGENT, REQ, granted.expires_at - timedelta(seconds=1)).state == ap.USED


def test_tick_leaves_a_decided_approval_alone() -> None:
    d = ap.deny(new(), ALICE, "no", T0)
    t = ap.tick(d, T0 + timedelta(days=1))
    assert t.approval is d and not t.expired and t.escalate_to == ()


def test_break_glass_records_its_request_and_retries_in_one_second_at_least() -> None:
    bg = ap.break_glass_issue(approval_id="b7", request_id="r7", spiffe_id=AGENT, request=REQ,
                              rule=RULE, owner_team="incident-response",
                              escalation=("ir-oncall",), now=T0)
    assert (bg.id, bg.request_id, bg.spiffe_id, bg.owner_team, bg.escalation) == (
        "b7", "r7", AGENT, "incident-response", ("ir-oncall",))
    assert bg.request_hash == ap.request_hash(AGENT, REQ)
    assert RULE.break_glass is not None
    per_minute = replace(RULE, break_glass=replace(RULE.break_glass, limit=parse_budget("1/m")))
    with pytest.raises(ap.BreakGlassLimitError) as err:
        ap.break_glass_issue(approval_id="b8", request_id="r8", spiffe_id=AGENT, request=REQ,
                             rule=per_minute, owner_team="ir", escalation=(),
                             now=T0 + timedelta(seconds=59, milliseconds=500),
                             recent_uses=(T0,))
    assert err.value.retry_after_seconds == 1


def test_sign_off_records_the_reviewer_and_refuses_with_reasons() -> None:
    bg = ap.break_glass_issue(approval_id="b1", request_id="r", spiffe_id=AGENT, request=REQ,
                              rule=RULE, owner_team="ciso-office", escalation=(), now=T0)
    # The owner team may review: CISO is in ciso-office, the (here) owning team.
    done = ap.sign_off(bg, CISO, "justified", T0 + timedelta(seconds=9))
    assert done.review == ap.Vote(subject="carol", groups=("ciso-office",), via="oidc",
                                  reason="justified", at=T0 + timedelta(seconds=9))
    with pytest.raises(ap.ApprovalError) as err:
        ap.sign_off(new(), CISO, "ok", T0)
    assert str(err.value) == "approval a1 is pending, not a break-glass use awaiting review"
    with pytest.raises(ap.ApprovalError) as err:
        ap.sign_off(bg, CISO, "  ", T0)
    assert str(err.value) == "a reason is required: it goes into the audit log"
    # A break-glass use without reviewers configured: nobody is in the reviewer groups.
    with pytest.raises(ap.ApprovalError, match="none of the groups that may review"):
        ap.sign_off(replace(bg, break_glass=None), CISO, "ok", T0)


def test_refusals_list_every_group() -> None:
    two = ap.Approver(subject="dan", groups=("sales", "hr"), via="oidc")
    with pytest.raises(ap.ApprovalError) as err:
        ap.approve(replace(new(), approvers=("ir-leads", "soc")), two, "ok", T0)
    assert str(err.value).endswith("(ir-leads, soc); their groups: sales, hr")
