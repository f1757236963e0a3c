"""The scope map's JSON Schema problems in words, pinned where mutation testing showed the
suite was loose: each validator's message with and without the field's description, the
line a missing field is reported at, and which branch of a ``oneOf`` explains a mapping.
Pure: a composed YAML document in, (file:line, field, what) out."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from broker.core.scopemap.schema import schema_problems


def _class(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "risk": "low", "owner": {"team": "soc", "contact": "x"}, "escalation": ["o"],
        "workloads": ["spiffe://e.org/a"],
        "credential": {"ttl": "2m", "max_ttl": "5m",
                       "vault_policy": [{"path": "secret/x", "capabilities": ["read"]}]},
    }
    base.update(over)
    return base


def _cred(**over: Any) -> dict[str, Any]:
    return _class(credential={"ttl": "2m", "max_ttl": "5m",
                              "vault_policy": [{"path": "secret/x", "capabilities": ["read"]}],
                              **over})


def _text(cls: dict[str, Any], **top: Any) -> str:
    return yaml.safe_dump({"apiVersion": "credbroker/v1", "kind": "ScopeMap",
                           "action_classes": {"c": cls}, **top}, sort_keys=False)


def _problems(text: str) -> list[tuple[str, str, str]]:
    root = yaml.compose(text)
    assert root is not None
    return schema_problems("m.yaml", root)


JIT = {"mode": "jit", "approvers": ["a"]}
C = "action_classes.c"


@pytest.mark.parametrize(("text", "problems"), [
    # required: the hint is the field's own description, else its $ref target's, else none
    (_text({k: v for k, v in _class().items() if k != "owner"}),
     [("m.yaml:4", f"{C}.owner", "is required: the team that owns this class and how to reach "
                                 "it (a class without a named owner does not load)")]),
    (_text(_class(credential={"max_ttl": "5m", "vault_policy": [
        {"path": "secret/x", "capabilities": ["read"]}]})),
     [("m.yaml:13", f"{C}.credential.ttl", "is required: a duration such as 90s, 5m or 1h")]),
    (_text(_class(owner={"contact": "x"})), [("m.yaml:6", f"{C}.owner.team", "is required")]),
    (_text(_cred(vault_policy=[{"path": "secret/x"}])),
     [("m.yaml:17", f"{C}.credential.vault_policy[0].capabilities", "is required")]),
    # unknown fields name every allowed one
    (_text(_class(owner={"team": "a", "contact": "b", "pager": "c"})),
     [("m.yaml:9", f"{C}.owner.pager", "unknown field; expected one of: contact, team")]),
    # const and enum
    (_text(_class()).replace("credbroker/v1", "credbroker/v9"),
     [("m.yaml:1", "apiVersion", "is 'credbroker/v9'; expected 'credbroker/v1'")]),
    (_text(_class(federated="sometimes")),
     [("m.yaml:20", f"{C}.federated", "is 'sometimes'; expected one of deny, approval, allow")]),
    # types, with the description when the field has one
    (_text(_class(escalation="oncall")), [("m.yaml:9", f"{C}.escalation", "must be a list")]),
    (_text(_class(owner="soc")),
     [("m.yaml:6", f"{C}.owner", "must be a mapping: the team that owns this class and how to "
                                 "reach it (a class without a named owner does not load)")]),
    (_text(_class(approval={**JIT, "approvals_required": "two"})),
     [("m.yaml:24", f"{C}.approval.approvals_required", "must be an integer")]),
    (_text(_class(approval={**JIT, "break_glass": {"allowed": "maybe", "reviewers": ["r"]}})),
     [("m.yaml:25", f"{C}.approval.break_glass.allowed", "must be true or false")]),
    (_text(_cred(vault_policy="x")),
     [("m.yaml:16", f"{C}.credential.vault_policy",
       "must be a list: Vault policy rules: {path, capabilities}")]),
    # empty lists and strings, minimums
    (_text(_cred(vault_policy=[])),
     [("m.yaml:16", f"{C}.credential.vault_policy",
       "must be a non-empty list of Vault policy rules: {path, capabilities}")]),
    (_text(_cred(vault_policy=[{"path": "secret/x", "capabilities": []}])),
     [("m.yaml:18", f"{C}.credential.vault_policy[0].capabilities", "must be a non-empty list")]),
    (_text(_class(owner={"team": "", "contact": "x"})),
     [("m.yaml:7", f"{C}.owner.team", "must not be empty"),
      ("m.yaml:7", f"{C}.owner.team", "must not be blank")]),
    (_text(_class(approval={**JIT, "approvals_required": 0})),
     [("m.yaml:24", f"{C}.approval.approvals_required", "must be at least 1")]),
    (_text(_class(limits={"per_workload": "lots"})),
     [("m.yaml:21", f"{C}.limits.per_workload",
       "'lots' is not of the expected form: at most N credentials of this class per workload "
       "per minute, hour or day, e.g. 5/h")]),
    # oneOf: a scalar is explained by the field's description; a mapping by the branch
    # that takes mappings (never by the scalar branches' type errors)
    (_text(_cred(ttl={"a": 1})),
     [("m.yaml:14", f"{C}.credential.ttl",
       "{'a': 1} is not valid: expected a duration such as 90s, 5m or 1h")]),
    (_text(_class(approval="sometimes")),
     [("m.yaml:20", f"{C}.approval",
       "'sometimes' is not valid: expected none, or a JIT approval rule")]),
    (_text(_class(approval={"mode": "jit", "colour": 1})),
     [("m.yaml:22", f"{C}.approval.colour", "unknown field; expected one of: "
       "approvals_required, approvers, break_glass, escalate_after, expires, mode")]),
])
def test_each_schema_problem_in_words_at_its_line(text: str,
                                                  problems: list[tuple[str, str, str]]) -> None:
    assert _problems(text) == problems


def test_a_missing_top_level_field_is_reported_where_the_document_starts() -> None:
    assert _problems("# a comment\n# another\naction_classes: {}\nkind: ScopeMap\n") == [
        ("m.yaml:3", "apiVersion", "is required: always credbroker/v1")]
