"""The scope tools (explain, test, JUnit, diff, owners, blast radius, replay), pinned where
mutation testing showed the suite was loose: the exact lines an engineer reads, each
malformed test-cases file's message, and how replay counts budgets. Pure: maps in, text
out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from broker.core.models import CredentialRequest, Outcome
from broker.core.records import RecordedDecision
from broker.core.scopemap import ScopeMap, evaluate, parse_scope_map
from broker.core.scopemap.tools import (
    NARROWS,
    REVIEW,
    WIDENS,
    CasesError,
    Change,
    blast_radius,
    codeowners,
    diff_maps,
    explain_lines,
    junit_xml,
    replay,
    run_cases,
)
from broker.core.spiffeid import SpiffeId

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
TRIAGE = SpiffeId.parse("spiffe://example.org/agent/triage")


def _class(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "risk": "low",
        "owner": {"team": "soc", "contact": "soc@example.org"},
        "escalation": ["oncall", "manager"],
        "workloads": ["spiffe://example.org/agent/triage"],
        "credential": {"ttl": "2m", "max_ttl": "5m",
                       "vault_policy": [{"path": "secret/data/x/*",
                                         "capabilities": ["read", "list"]}]},
    }
    base.update(over)
    return base


def _doc(classes: dict[str, Any], team: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "credbroker/v1", "kind": "ScopeMap",
                           "action_classes": classes}
    if team:
        doc["metadata"] = {"team": team}
    return doc


def _map(*files: tuple[str, dict[str, Any]]) -> ScopeMap:
    return parse_scope_map([(n, yaml.safe_dump(d, sort_keys=False)) for n, d in files])


MAP = _map(("map.yaml", _doc({
    "c": _class(limits={"per_workload": "1/h"}),
    "j": _class(approval={"mode": "jit", "approvers": ["ir-leads", "soc-leads"]}),
})))
WHY_C = ("spiffe://example.org/agent/triage matches spiffe://example.org/agent/triage "
         "(c.workloads[0] at map.yaml:4); no approval required (approval: none)")


def _explain(action_class: str) -> list[str]:
    return explain_lines(evaluate(MAP, TRIAGE, CredentialRequest(action_class=action_class),
                                  NOW), MAP)


def test_explain_of_an_allow_names_class_owner_path_limits_rule_and_credential() -> None:
    assert _explain("c") == [
        "decision:   ALLOW",
        "identity:   spiffe://example.org/agent/triage",
        "class:      c (risk low) defined at map.yaml:4",
        "owner:      soc <soc@example.org>",
        "escalation: oncall → manager",
        "limits:     c.limits.per_workload 1/h: past it, refuse the request (429) until the "
        "window frees up",
        "rule:       c.workloads[0]",
        f"why:        {WHY_C}",
        "credential: policies credbroker-c, TTL 120s",
        f"scope map:  {MAP.version}",
    ]


def test_explain_of_an_approval_and_of_a_denial() -> None:
    assert _explain("j")[0] == "decision:   NEEDS APPROVAL"
    assert _explain("j")[-2] == "credential: policies credbroker-j, TTL 120s"
    assert _explain("nope") == [
        "decision:   DENY (unknown_action_class)",
        "identity:   spiffe://example.org/agent/triage",
        "rule:       default-deny",
        "why:        action class 'nope' is not defined in the scope map (known classes: c, j)",
        f"scope map:  {MAP.version}",
    ]


def _cases(*cases: dict[str, Any]) -> str:
    return yaml.safe_dump({"cases": list(cases)})


def test_every_field_of_a_failed_expectation_is_named_with_both_values() -> None:
    [r] = run_cases(MAP, _cases({
        "name": "a", "spiffe_id": str(TRIAGE), "request": {"action_class": "c"},
        "expect": {"outcome": "deny", "deny_code": "x", "rule": "r", "ttl_seconds": 5,
                   "reason_contains": "zzz"}}), "cases.yaml", default_now=NOW)
    assert not r.passed
    assert r.mismatches == (
        "outcome: expected 'deny', got 'allow'",
        "deny_code: expected 'x', got None",
        "rule: expected 'r', got 'c.workloads[0]'",
        "ttl_seconds: expected 5, got 120",
        f"reasons: expected to contain 'zzz', got [{WHY_C!r}]",
    )
    [ok] = run_cases(MAP, _cases({
        "spiffe_id": str(TRIAGE), "request": {"action_class": "c"},
        "expect": {"outcome": "allow", "rule": "c.workloads[0]", "ttl_seconds": 120,
                   "reason_contains": "no approval required"}}), "cases.yaml", default_now=NOW)
    assert ok.passed and ok.mismatches == () and ok.name == "case 0"


@pytest.mark.parametrize(("text", "message"), [
    ("[]", "cases.yaml: expected a mapping with a non-empty list `cases:`"),
    ("cases: []", "cases.yaml: expected a mapping with a non-empty list `cases:`"),
    ("cases: {a: 1}", "cases.yaml: expected a mapping with a non-empty list `cases:`"),
    ("cases: [1]", "cases.yaml: cases[0]: each case must be a mapping"),
    ("cases: [{name: a, colour: red, size: 1}]",
     "cases.yaml: case 'a': unknown field(s) colour, size"),
    ("cases: [{name: a, spiffe_id: bad, request: {action_class: c}, expect: {outcome: allow}}]",
     "cases.yaml: case 'a': SPIFFE ID 'bad' must start with 'spiffe://'; expected "
     "spiffe://<trust-domain>/<path>"),
    ("cases: [{request: {action_class: c}, expect: {outcome: allow}}]",
     "cases.yaml: case 'case 0': SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>"),
    ("cases: [{name: a, spiffe_id: 'spiffe://example.org/a', request: [], "
     "expect: {outcome: allow}}]", "cases.yaml: case 'a': request must be a mapping"),
    ("cases: [{spiffe_id: 'spiffe://example.org/a', now: noon, request: {action_class: c}, "
     "expect: {outcome: allow}}]", "cases.yaml: case 'case 0': Invalid isoformat string: 'noon'"),
    ("cases: [{spiffe_id: 'spiffe://example.org/a', request: {action_class: c}, expect: [1]}]",
     "cases.yaml: case 'case 0': expect must be a mapping with at least outcome (allow, deny "
     "or needs_approval)"),
    ("cases: [{spiffe_id: 'spiffe://example.org/a', request: {action_class: c}, "
     "expect: {rule: x}}]",
     "cases.yaml: case 'case 0': expect must be a mapping with at least outcome (allow, deny "
     "or needs_approval)"),
    ("cases: [{spiffe_id: 'spiffe://example.org/a', request: {action_class: c}, "
     "expect: {outcome: allow, z: 1, a: 2}}]",
     "cases.yaml: case 'case 0': unknown expect field(s) a, z; allowed: deny_code, outcome, "
     "reason_contains, rule, ttl_seconds"),
])
def test_each_malformed_cases_file_says_which_case_and_what_is_wrong(text: str,
                                                                      message: str) -> None:
    with pytest.raises(CasesError) as err:
        run_cases(MAP, text, "cases.yaml", default_now=NOW)
    assert str(err.value) == message


def test_the_junit_report_whole() -> None:
    results = run_cases(MAP, _cases(
        {"name": "a", "spiffe_id": str(TRIAGE), "request": {"action_class": "c"},
         "expect": {"outcome": "deny", "rule": "r"}},
        {"spiffe_id": str(TRIAGE), "request": {"action_class": "c"},
         "expect": {"outcome": "allow"}}), "cases.yaml", default_now=NOW)
    assert junit_xml(results, suite="cases.yaml", version="v1") == (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<testsuites name="credbroker scope test" tests="2" failures="1" errors="0">\n'
        '  <testsuite name="cases.yaml" tests="2" failures="1" errors="0" skipped="0">\n'
        "    <properties>\n"
        '      <property name="scope_map_version" value="v1" />\n'
        "    </properties>\n"
        '    <testcase name="a" classname="cases.yaml">\n'
        "      <failure message=\"outcome: expected 'deny', got 'allow'; rule: expected 'r', "
        "got 'c.workloads[0]'\" type=\"ScopeTestMismatch\">outcome: expected 'deny', got "
        "'allow'\n"
        "rule: expected 'r', got 'c.workloads[0]'\n"
        f"decided by c.workloads[0]: {WHY_C}</failure>\n"
        "    </testcase>\n"
        '    <testcase name="case 1" classname="cases.yaml" />\n'
        "  </testsuite>\n"
        "</testsuites>\n")


def test_codeowners_lists_each_file_with_its_team_or_commented_out() -> None:
    m = _map(("maps/soc.yaml", _doc({"c": _class()}, "soc")),
             ("maps/misc.yaml", _doc({"e": _class()})))
    head = "# generated by `credbroker scope owners` from each file's metadata.team\n"
    assert codeowners(m) == (head + "# maps/misc.yaml: no metadata.team\nmaps/soc.yaml @soc\n")
    assert codeowners(m, prefix="scope/", handle="@org/{team}-team") == (
        head + "# scope/misc.yaml: no metadata.team\nscope/soc.yaml @org/soc-team\n")


OLD = _map(("m.yaml", _doc({
    "c": _class(), "gone": _class(workloads=["spiffe://example.org/agent/old"])})))
NEW = _map(("m.yaml", _doc({
    "c": _class(workloads=["spiffe://example.org/agent/triage", "spiffe://example.org/agent/x"],
                credential={"ttl": "3m", "max_ttl": "5m", "vault_policy": [
                    {"path": "secret/data/x/*", "capabilities": ["read", "list"]}]}),
    "n": _class(risk="high", workloads=["spiffe://example.org/agent/n"])})))


def test_the_blast_radius_says_per_workload_what_it_gains_and_loses() -> None:
    changes = diff_maps(OLD, NEW)
    assert [c.text() for c in changes] == [
        "+ c: workloads gained: spiffe://example.org/agent/x",
        "+ c: ttl: 120s → 180s",
        "- gone: class removed (was requestable by spiffe://example.org/agent/old)",
        "+ n: new class, requestable by spiffe://example.org/agent/n",
    ]
    # a widening reaches every workload of the class as the new map has it
    assert blast_radius(changes, NEW, OLD) == {
        "spiffe://example.org/agent/n": ["+ n (high)"],
        "spiffe://example.org/agent/old": ["- gone"],
        "spiffe://example.org/agent/triage": ["+ c: ttl widened"],
        "spiffe://example.org/agent/x": ["+ c (low)", "+ c: ttl widened"],
    }
    lost = diff_maps(NEW, OLD)
    assert blast_radius(lost, OLD, NEW)["spiffe://example.org/agent/x"] == ["- c"]


def test_dropping_jit_approval_names_both_rules() -> None:
    jit = _map(("m.yaml", _doc({"c": _class(approval={
        "mode": "jit", "approvers": ["a", "b"], "approvals_required": 2})})))
    plain = _map(("m.yaml", _doc({"c": _class()})))
    assert [c.text() for c in diff_maps(jit, plain)] == ["+ c: approval: jit(2 of a,b) → none"]
    assert [c.text() for c in diff_maps(plain, jit)] == ["- c: approval: none → jit(2 of a,b)"]


@pytest.mark.parametrize(("old", "new", "effect"), [
    # people dropped, but the rest reordered: not simply less oversight
    (["oncall", "manager", "ciso"], ["manager", "oncall"], "review"),
    # people added, but the rest reordered: not simply more oversight
    (["oncall", "manager"], ["manager", "oncall", "ciso"], "review"),
    (["oncall", "manager", "ciso"], ["oncall", "ciso"], "widens"),
    (["oncall", "ciso"], ["oncall", "manager", "ciso"], "narrows"),
])
def test_an_escalation_path_change_is_judged_by_people_and_order(old: list[str], new: list[str],
                                                                 effect: str) -> None:
    a = _map(("m.yaml", _doc({"c": _class(escalation=old)})))
    b = _map(("m.yaml", _doc({"c": _class(escalation=new)})))
    [c] = diff_maps(a, b)
    assert (c.kind, c.effect) == ("escalation", effect)


def _rec(at: datetime, sid: str = str(TRIAGE), cls: str = "c",
         outcome: Outcome = Outcome.ALLOW) -> RecordedDecision:
    return RecordedDecision(time=at, request_id=f"r-{at.timestamp()}-{sid}",
                            spiffe_id=SpiffeId.parse(sid),
                            request=CredentialRequest(action_class=cls), outcome=outcome,
                            scope_map_version="old")


def test_replay_counts_budgets_per_identity_and_class_from_what_it_allowed() -> None:
    budget = _map(("m.yaml", _doc({
        "c": _class(workloads=["spiffe://example.org/agent/*"], limits={"per_workload": "1/h"}),
        "d": _class(workloads=["spiffe://example.org/agent/*"]),
    })))
    other = "spiffe://example.org/agent/other"
    records = [  # out of order: replay goes by time
        _rec(NOW + timedelta(minutes=2)),
        _rec(NOW),
        _rec(NOW + timedelta(minutes=1), sid=other),  # another identity: its own budget
        _rec(NOW + timedelta(minutes=3), cls="d"),  # another class: no budget
        _rec(NOW + timedelta(minutes=4), outcome=Outcome.DENY),
        _rec(NOW + timedelta(minutes=90)),  # the window has passed
    ]
    result = replay(budget, records)
    assert result.total == 6
    assert [(c.record.time, c.new.outcome, c.new.deny_code and c.new.deny_code.value)
            for c in result.changed] == [
        (NOW + timedelta(minutes=2), Outcome.DENY, "budget_exhausted")]
    # a denial is not counted: the next request within the window is still refused once
    records.append(_rec(NOW + timedelta(minutes=91)))
    changed = replay(budget, records).changed
    assert [c.record.time for c in changed] == [NOW + timedelta(minutes=2),
                                               NOW + timedelta(minutes=91)]


@pytest.mark.parametrize(("change", "text"), [
    (Change(action_class="c", kind="class_added", before=None, after=("spiffe://a", "spiffe://b"),
            effect=WIDENS), "+ c: new class, requestable by spiffe://a, spiffe://b"),
    (Change(action_class="c", kind="class_removed", before=("spiffe://a", "spiffe://b"),
            after=None, effect=NARROWS),
     "- c: class removed (was requestable by spiffe://a, spiffe://b)"),
    (Change(action_class="c", kind="workloads_gained", before=("x",), after=("y", "z"),
            effect=WIDENS), "+ c: workloads gained: y, z"),
    (Change(action_class="c", kind="policy_rules_added", before=("x",), after=("y",),
            effect=WIDENS), "+ c: policy rules added: y"),
    (Change(action_class="c", kind="approvers_lost", before=("x", "w"), after=("y",),
            effect=NARROWS), "- c: approvers lost: x, w"),
    (Change(action_class="c", kind="capabilities_lost", before="secret/data/x",
            after=("read", "list"), effect=NARROWS),
     "- c: capabilities lost on secret/data/x: read, list"),
    (Change(action_class="c", kind="escalation", before=("a", "b"), after=("b", "a"),
            effect=REVIEW), "~ c: escalation path changed: a → b  ⇒  b → a"),
    (Change(action_class="c", kind="owner_team", before="soc", after="ir", effect=REVIEW),
     "~ c: owner team (review): soc → ir"),
    (Change(action_class="c", kind="max_ttl", before="2m", after="5m", effect=WIDENS),
     "+ c: max ttl: 2m → 5m"),
])
def test_each_kind_of_change_reads_as_the_reviewer_sees_it(change: Change, text: str) -> None:
    assert change.text() == text
