"""`scope diff` classification and `scope test` reports, pure (maps in, changes out)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from broker.core.scopemap import ScopeMap, parse_scope_map
from broker.core.scopemap.tools import Change, diff_maps, junit_xml, run_cases

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
JIT: dict[str, Any] = {"mode": "jit", "approvers": ["ir-leads"], "approvals_required": 2,
                       "escalate_after": "5m", "expires": "30m"}


def _class(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "risk": "low",
        "owner": {"team": "soc", "contact": "soc@example.org"},
        "escalation": ["oncall", "manager"],
        "workloads": ["spiffe://example.org/agent/triage"],
        "credential": {"ttl": "2m", "max_ttl": "5m",
                       "vault_policy": [{"path": "secret/data/x/*", "capabilities": ["read"]}]},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def _map(**over: Any) -> ScopeMap:
    doc = {"apiVersion": "credbroker/v1", "kind": "ScopeMap",
           "action_classes": {"c": _class(**over)}}
    return parse_scope_map([("map.yaml", yaml.safe_dump(doc, sort_keys=False))])


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    return diff_maps(_map(**old), _map(**new))


def _effects(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    return {c.kind: c.effect for c in _diff(old, new)}


def _cred(ttl: str = "2m", max_ttl: str = "5m",
          rules: tuple[tuple[str, tuple[str, ...]], ...] = (("secret/data/x/*", ("read",)),)
          ) -> dict[str, Any]:
    return {"ttl": ttl, "max_ttl": max_ttl,
            "vault_policy": [{"path": p, "capabilities": list(c)} for p, c in rules]}


def _bg(**over: Any) -> dict[str, Any]:
    return {**JIT, "break_glass": {"allowed": True, "max_ttl": "1m",
                                   "reviewers": ["ciso-office"], **over}}


# --- targets: no `targets` means any target -----------------------------------------


def test_adding_a_target_pattern_where_any_target_was_allowed_narrows() -> None:
    [c] = _diff({}, {"targets": ["ws-*"]})
    assert (c.kind, c.effect, c.widens) == ("targets_restricted", "narrows", False)
    assert c.text() == "- c: targets restricted: any target → ws-*"


def test_removing_every_target_pattern_widens() -> None:
    [c] = _diff({"targets": ["ws-*", "srv-*"]}, {})
    assert (c.kind, c.effect) == ("targets_unrestricted", "widens")
    assert c.text() == "+ c: targets unrestricted: ws-*, srv-* → any target"


def test_adding_and_removing_one_of_several_patterns() -> None:
    assert _effects({"targets": ["ws-*"]}, {"targets": ["ws-*", "srv-*"]}) \
        == {"targets_gained": "widens"}
    assert _effects({"targets": ["ws-*", "srv-*"]}, {"targets": ["ws-*"]}) \
        == {"targets_lost": "narrows"}


# --- each rule -----------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "kind", "effect"), [
    # who may ask
    ({}, {"workloads": ["spiffe://example.org/agent/triage", "spiffe://example.org/agent/*"]},
     "workloads_gained", "widens"),
    ({"workloads": ["spiffe://example.org/agent/triage", "spiffe://example.org/agent/*"]}, {},
     "workloads_lost", "narrows"),
    # credential lifetime
    ({}, {"credential": _cred(ttl="3m")}, "ttl", "widens"),
    ({"credential": _cred(ttl="3m")}, {}, "ttl", "narrows"),
    ({}, {"credential": _cred(max_ttl="10m")}, "max_ttl", "widens"),
    ({"credential": _cred(max_ttl="10m")}, {}, "max_ttl", "narrows"),
    # approval
    ({"approval": JIT}, {}, "approval", "widens"),
    ({}, {"approval": JIT}, "approval", "narrows"),
    ({"approval": JIT}, {"approval": {**JIT, "approvals_required": 1}},
     "approvals_required", "widens"),
    ({"approval": {**JIT, "approvals_required": 1}}, {"approval": JIT},
     "approvals_required", "narrows"),
    ({"approval": JIT}, {"approval": {**JIT, "expires": "1h"}}, "approval_expires", "widens"),
    ({"approval": {**JIT, "expires": "1h"}}, {"approval": JIT}, "approval_expires", "narrows"),
    ({"approval": JIT}, {"approval": {**JIT, "approvers": ["ir-leads", "interns"]}},
     "approvers_gained", "widens"),
    ({"approval": {**JIT, "approvers": ["ir-leads", "interns"]}}, {"approval": JIT},
     "approvers_lost", "narrows"),
    ({"approval": JIT}, {"approval": {**JIT, "escalate_after": "10m"}},
     "escalate_after", "review"),
    # break glass
    ({"approval": JIT}, {"approval": _bg()}, "break_glass", "widens"),
    ({"approval": _bg(allowed=False)}, {"approval": _bg()}, "break_glass", "widens"),
    ({"approval": _bg()}, {"approval": JIT}, "break_glass", "narrows"),
    ({"approval": _bg()}, {"approval": _bg(limit="3/h")}, "break_glass_limit", "widens"),
    ({"approval": _bg(limit="3/h")}, {"approval": _bg(limit="1/d")}, "break_glass_limit",
     "narrows"),
    ({"approval": _bg()}, {"approval": _bg(max_ttl="2m")}, "break_glass_max_ttl", "widens"),
    ({"approval": _bg()}, {"approval": _bg(reviewers=["x"])}, "break_glass_reviewers",
     "review"),
    # budgets
    ({"limits": {"per_workload": "5/h"}}, {"limits": {"per_workload": "10/h"}}, "limits",
     "widens"),
    ({"limits": {"per_workload": "5/h"}}, {}, "limits", "widens"),
    ({}, {"limits": {"per_workload": "5/h"}}, "limits", "narrows"),
    ({"limits": {"per_workload": "5/h"}}, {"limits": {"per_workload": "5/d"}}, "limits",
     "narrows"),
    # conditions
    ({}, {"when": "request.ttl_seconds <= 60"}, "when", "narrows"),
    ({"when": "request.ttl_seconds <= 60"}, {}, "when", "widens"),
    ({"when": "request.ttl_seconds <= 60"}, {"when": "request.ttl_seconds <= 120"}, "when",
     "review"),
    # required fields and risk
    ({}, {"requires": ["justification"]}, "requires", "narrows"),
    ({"requires": ["justification"]}, {}, "requires", "widens"),
    ({"risk": "high"}, {"risk": "low", "requires": ["initiating_event"]}, "risk", "widens"),
    # Vault
    ({}, {"credential": _cred(rules=(("secret/data/x/*", ("read",)),
                                     ("secret/data/y/*", ("read",))))},
     "policy_rules_added", "widens"),
    ({"credential": _cred(rules=(("secret/data/x/*", ("read",)),
                                 ("secret/data/y/*", ("read",))))}, {},
     "policy_rules_removed", "narrows"),
    ({}, {"credential": _cred(rules=(("secret/data/x/*", ("read", "delete")),))},
     "capabilities_gained", "widens"),
    ({"credential": _cred(rules=(("secret/data/x/*", ("read", "delete")),))}, {},
     "capabilities_lost", "narrows"),
    # oversight
    ({}, {"owner": {"team": "iam", "contact": "iam@example.org"}}, "owner", "review"),
    ({"escalation": ["oncall", "manager", "ciso"]}, {}, "escalation", "widens"),
    ({}, {"escalation": ["oncall", "manager", "ciso"]}, "escalation", "narrows"),
    ({}, {"escalation": ["manager", "oncall"]}, "escalation", "review"),
])
def test_each_change_is_classified(old: dict[str, Any], new: dict[str, Any], kind: str,
                                   effect: str) -> None:
    effects = _effects(old, new)
    assert effects.get(kind) == effect, effects


def test_changed_capabilities_name_the_path_and_nothing_else() -> None:
    changes = _diff({}, {"credential": _cred(rules=(("secret/data/x/*", ("read", "list")),))})
    assert [c.text() for c in changes] == ["+ c: capabilities gained on secret/data/x/*: list"]


def test_review_changes_are_marked_with_a_tilde_and_say_so() -> None:
    [c] = _diff({"when": "request.ttl_seconds <= 60"}, {"when": "request.ttl_seconds <= 120"})
    assert c.text() == ("~ c: when (review): request.ttl_seconds <= 60 → "
                        "request.ttl_seconds <= 120")
    assert not c.widens


def test_an_escalation_change_is_one_line_with_both_paths() -> None:
    changes = _diff({}, {"escalation": ["oncall", "ciso"]})
    assert [c.text() for c in changes] == [
        "~ c: escalation path changed: oncall → manager  ⇒  oncall → ciso"]


def test_a_class_added_widens_and_removed_narrows() -> None:
    m = _map()
    doc = {"apiVersion": "credbroker/v1", "kind": "ScopeMap",
           "action_classes": {"c": _class(), "d": _class()}}
    both = parse_scope_map([("map.yaml", yaml.safe_dump(doc))])
    assert [(c.kind, c.effect) for c in diff_maps(m, both)] == [("class_added", "widens")]
    assert [(c.kind, c.effect) for c in diff_maps(both, m)] == [("class_removed", "narrows")]
    assert diff_maps(m, m) == []


# --- JUnit ---------------------------------------------------------------------------


def test_junit_xml_has_one_testcase_per_case_and_failures_say_what_differed() -> None:
    m = _map()
    cases = yaml.safe_dump({"cases": [
        {"name": "triage may enrich", "spiffe_id": "spiffe://example.org/agent/triage",
         "request": {"action_class": "c"}, "expect": {"outcome": "allow"}},
        {"name": "wrong on purpose", "spiffe_id": "spiffe://example.org/agent/other",
         "request": {"action_class": "c"}, "expect": {"outcome": "allow"}},
    ]})
    results = run_cases(m, cases, "cases.yaml", default_now=NOW)
    report = junit_xml(results, suite="cases.yaml", version=m.version)
    root = ET.fromstring(report)  # noqa: S314 - the report we just wrote
    assert root.tag == "testsuites" and root.get("tests") == "2" and root.get("failures") == "1"
    [suite] = root.findall("testsuite")
    cases_el = suite.findall("testcase")
    assert [c.get("name") for c in cases_el] == ["triage may enrich", "wrong on purpose"]
    assert cases_el[0].find("failure") is None
    failure = cases_el[1].find("failure")
    assert failure is not None
    assert failure.get("message") == "outcome: expected 'allow', got 'deny'"
    assert "decided by c.workloads" in (failure.text or "")
    assert suite.find("properties/property[@name='scope_map_version']") is not None
