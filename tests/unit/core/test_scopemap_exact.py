"""The decision and the scope map's text handling, pinned where mutation testing showed the
suite was loose: every field of a frozen, unknown-class and rule denial (a responder and
the audit log read them all), a class's Vault policy document, how a YAML error is told
(a tab in the indentation or not), and a condition's parse errors. Pure: values in, values
out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from broker.core.conditions import Condition, ConditionError
from broker.core.models import (
    CredentialRequest,
    Decision,
    DenyCode,
    InitiatingEvent,
    Outcome,
    Owner,
)
from broker.core.revocation import Freeze
from broker.core.scopemap import evaluate, parse_scope_map
from broker.core.scopemap.parse import yaml_error_text
from broker.core.spiffeid import SpiffeId

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
TRIAGE = SpiffeId.parse("spiffe://example.org/agent/triage")
EVENT = InitiatingEvent(source="s", id="1")


def _class(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "risk": "high", "owner": {"team": "soc", "contact": "soc@example.org"},
        "escalation": ["oncall", "manager"], "workloads": ["spiffe://example.org/agent/triage"],
        "credential": {"ttl": "2m", "max_ttl": "5m", "vault_policy": [
            {"path": "secret/data/x/*", "capabilities": ["read", "list"]},
            {"path": "secret/data/y", "capabilities": ["read"]}]},
    }
    base.update(over)
    return base


MAP = parse_scope_map([("map.yaml", yaml.safe_dump({
    "apiVersion": "credbroker/v1", "kind": "ScopeMap", "action_classes": {
        "c": _class(targets=["ws-*", "srv-*"], when="request.ttl_seconds < 250"),
        "f": _class(federated="allow")}}, sort_keys=False))])
SOC = Owner(team="soc", contact="soc@example.org")


def _denial(action_class: str, rule: str, reason: str, code: DenyCode, *,
            of_class: bool = True) -> Decision:
    return Decision(outcome=Outcome.DENY, spiffe_id=TRIAGE, action_class=action_class,
                    rule=rule, reasons=(reason,), scope_map_version=MAP.version,
                    deny_code=code, owner=SOC if of_class else None,
                    escalation=("oncall", "manager") if of_class else (),
                    source="map.yaml:4" if of_class else "", risk="high" if of_class else "")


def test_a_freeze_of_the_class_denies_with_every_field_of_the_class() -> None:
    fr = Freeze(id="f-1", kind="action_class", pattern="c", reason="r", by="alice",
                created_at=NOW)
    assert evaluate(MAP, TRIAGE, CredentialRequest(action_class="c"), NOW,
                    freezes=[fr]) == _denial(
        "c", "freeze f-1", "action class c was frozen by alice at 2026-11-27T12:00:00+00:00: r",
        DenyCode.FROZEN)


def test_a_freeze_of_the_identity_denies_even_an_unknown_class() -> None:
    fr = Freeze(id="f-2", kind="spiffe_id", pattern=str(TRIAGE), reason="r", by="bob",
                created_at=NOW)
    assert evaluate(MAP, TRIAGE, CredentialRequest(action_class="zz"), NOW,
                    freezes=[fr]) == _denial(
        "zz", "freeze f-2", "spiffe://example.org/agent/triage was frozen by bob at "
        "2026-11-27T12:00:00+00:00: r", DenyCode.FROZEN, of_class=False)


def test_an_unknown_class_names_every_known_one_or_none() -> None:
    assert evaluate(MAP, TRIAGE, CredentialRequest(action_class="zz"), NOW) == _denial(
        "zz", "default-deny", "action class 'zz' is not defined in the scope map (known "
        "classes: c, f)", DenyCode.UNKNOWN_ACTION_CLASS, of_class=False)
    empty = type(MAP)(version="v", classes={}, sources=())
    d = evaluate(empty, TRIAGE, CredentialRequest(action_class="zz"), NOW)
    assert d.reasons == ("action class 'zz' is not defined in the scope map (known classes: "
                         "none)",)


@pytest.mark.parametrize(("request_", "federated_from", "rule", "reason", "code"), [
    (CredentialRequest(action_class="c"), "", "c.requires",
     "c requires initiating_event, target in the request (rule c.requires at map.yaml:4)",
     DenyCode.MISSING_FIELD),
    (CredentialRequest(action_class="c", target="dc-1", initiating_event=EVENT), "",
     "c.targets", "target 'dc-1' matches none of c's targets (ws-*, srv-*; rule c.targets at "
     "map.yaml:4)", DenyCode.TARGET_NOT_ALLOWED),
    (CredentialRequest(action_class="c", target="ws-1", initiating_event=EVENT,
                       ttl_seconds=400), "", "c.credential.max_ttl",
     "requested TTL 400s is above c's max_ttl of 300s; ask for less", DenyCode.TTL_TOO_LONG),
    (CredentialRequest(action_class="c", target="ws-1", initiating_event=EVENT,
                       ttl_seconds=280), "", "c.when",
     "c's condition `request.ttl_seconds < 250` is false for this request (rule c.when at "
     "map.yaml:4)", DenyCode.CONDITION_FALSE),
    (CredentialRequest(action_class="c", target="ws-1", initiating_event=EVENT), "other.org",
     "c.federated", "spiffe://example.org/agent/triage is a workload of the federated trust "
     "domain 'other.org' and c does not accept federated callers (federated: deny, the "
     "default; rule c.federated at map.yaml:4; owner soc)", DenyCode.FEDERATED_NOT_ALLOWED),
])
def test_each_rule_denies_with_its_rule_name_reason_and_the_class(
        request_: CredentialRequest, federated_from: str, rule: str, reason: str,
        code: DenyCode) -> None:
    assert evaluate(MAP, TRIAGE, request_, NOW, federated_from=federated_from) == _denial(
        "c", rule, reason, code)


def test_a_condition_that_cannot_be_evaluated_denies_under_the_when_rule() -> None:
    m = parse_scope_map([("map.yaml", yaml.safe_dump({
        "apiVersion": "credbroker/v1", "kind": "ScopeMap", "action_classes": {
            "c": _class(risk="low", when='identity.segments[5] == "x"')}}, sort_keys=False))])
    d = evaluate(m, TRIAGE, CredentialRequest(action_class="c"), NOW)
    assert (d.deny_code, d.rule) == (DenyCode.CONDITION_FALSE, "c.when")
    assert d.reasons[0].startswith("c's condition `identity.segments[5] == \"x\"` failed to "
                                   "evaluate: ")
    assert d.reasons[0].endswith("; denied (fail closed)")


def test_the_vault_policy_document_lists_each_path_with_its_capabilities() -> None:
    assert MAP.classes["c"].vault_policy_hcl() == (
        "# managed by credbroker: action class c\n"
        'path "secret/data/x/*" {\n  capabilities = ["read", "list"]\n}\n'
        'path "secret/data/y" {\n  capabilities = ["read"]\n}\n')


def _yaml_error(text: str) -> str:
    with pytest.raises(yaml.YAMLError) as err:
        yaml.compose(text, Loader=yaml.SafeLoader)
    return yaml_error_text("s.yaml", text, err.value)


@pytest.mark.parametrize(("text", "message"), [
    # a tab in the indentation, though the parser says something else
    ("a: 'x\n\t", "s.yaml:2: YAML does not allow tabs for indentation; use spaces"),
    # the parser names the tab, though it is not in the indentation
    ("a: [b\t", "s.yaml:1: YAML does not allow tabs for indentation; use spaces"),
    # a tab inside a line is no indentation problem
    ("key: 'x\t", "s.yaml:1: not valid YAML: found unexpected end of stream"),
    ("a: b: c\n", "s.yaml:1: not valid YAML: mapping values are not allowed here"),
])
def test_a_yaml_error_names_the_line_and_a_tab_only_where_one_is_to_blame(
        text: str, message: str) -> None:
    assert _yaml_error(text) == message


def test_a_yaml_error_without_a_position_or_without_a_problem() -> None:
    assert yaml_error_text("s.yaml", "x", yaml.YAMLError("boom")) == "s.yaml: not valid YAML: boom"
    unplaced = yaml.MarkedYAMLError(context="ctx", problem="p")
    assert yaml_error_text("s.yaml", "x", unplaced) == "s.yaml: not valid YAML: p"
    mark = yaml.Mark("s", 0, 0, 0, "x: 1\n", 0)
    no_problem = yaml.MarkedYAMLError(context="while parsing", problem=None, problem_mark=mark)
    assert yaml_error_text("s.yaml", "x: 1\n", no_problem) == (
        's.yaml:1: not valid YAML: while parsing\n  in "s", line 1, column 1:\n    x: 1\n    ^')


@pytest.mark.parametrize(("text", "message"), [
    ("request.target )", "is not a valid CEL expression (column 16): unexpected ')'\n"
                         "    request.target )\n                   ^"),
    ("request.target == ==", "is not a valid CEL expression (column 19): unexpected '=='\n"
                             "    request.target == ==\n                      ^"),
    ("'abc", "is not a valid CEL expression (column 1): unexpected character \"'\"\n"
             "    'abc\n    ^"),
])
def test_a_condition_syntax_error_names_what_was_unexpected(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as err:
        Condition.compile(text)
    assert str(err.value) == message


def test_a_condition_that_is_not_boolean_at_run_time_says_what_it_evaluated_to() -> None:
    cond = Condition.compile('{"a": true, "b": 1}[request.target]')  # typed only at run time
    with pytest.raises(ConditionError) as err:
        cond.evaluate(TRIAGE, CredentialRequest(action_class="c", target="b"), NOW)
    assert str(err.value) == "evaluated to IntType(1), not true or false"


def test_an_expression_that_ends_too_early_points_just_past_its_last_character() -> None:
    with pytest.raises(ConditionError) as err:
        Condition.compile("")
    assert err.value.problems == (
        "is not a valid CEL expression (column 1): the expression ends too early\n    \n    ^",)
    with pytest.raises(ConditionError) as err:  # trailing blank lines are not "the end"
        Condition.compile("request.target ==\n\n")
    assert err.value.problems[0].startswith(
        "is not a valid CEL expression (line 1, column 18): the expression ends too early\n"
        "    request.target ==\n                     ^")


EXTRA = parse_scope_map([("map.yaml", yaml.safe_dump({
    "apiVersion": "credbroker/v1", "kind": "ScopeMap", "action_classes": {
        "a": _class(approval={"mode": "jit", "approvers": ["ir-leads", "iam-leads"],
                              "approvals_required": 2, "escalate_after": "5m",
                              "expires": "10m"}),
        "b": _class(limits={"per_workload": "2/h", "on_exceed": "freeze"}),
        "p": _class()}}, sort_keys=False))])


def test_a_jit_decision_names_every_approver_and_nothing_federated() -> None:
    d = evaluate(EXTRA, TRIAGE, CredentialRequest(action_class="a", initiating_event=EVENT), NOW)
    assert d.outcome == Outcome.NEEDS_APPROVAL and d.risk == "high"
    assert d.reasons == (
        "spiffe://example.org/agent/triage matches spiffe://example.org/agent/triage "
        f"(a.workloads[0]); a requires 2 approval(s) from ir-leads, iam-leads (rule a.approval "
        f"at {EXTRA.classes['a'].source})",)


def test_a_budget_with_on_exceed_freeze_says_the_identity_is_frozen() -> None:
    d = evaluate(EXTRA, TRIAGE, CredentialRequest(action_class="b", initiating_event=EVENT), NOW,
                 recent_issuances=[NOW, NOW])
    assert d.reasons[0].endswith("; on_exceed: freeze, so the identity is frozen")
    assert (d.retry_after_seconds, d.freeze_rule) == (0, "b.limits.on_exceed")


def test_an_allowed_decision_carries_the_class_risk() -> None:
    d = evaluate(EXTRA, TRIAGE, CredentialRequest(action_class="p", initiating_event=EVENT), NOW)
    assert (d.outcome, d.risk, d.source) == (Outcome.ALLOW, "high", EXTRA.classes["p"].source)
