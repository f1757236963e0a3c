"""The scope map's parser, pinned where a seeded mutation sample showed the suite loose:
where a problem points, its exact words, what a federated approval rule defaults to, and
that a malformed number is a problem, not a crash. Pure: text in, map or problems out."""

from __future__ import annotations

import pytest

from broker.core.scopemap import parse_scope_map
from broker.core.scopemap.model import ApprovalRule
from broker.errors import ScopeMapError

DOC = """apiVersion: credbroker/v1
kind: ScopeMap
metadata: {team: soc}
action_classes:
  enrichment:
    description: look things up
    risk: low
    owner:
      contact: x@example.org
      team: soc
    escalation: [e]
    workloads: [spiffe://example.org/agent/triage]
    credential: {ttl: 1m, max_ttl: 1m, vault_policy: [{path: secret/data/x, capabilities: [read]}]}
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ScopeMapError) as err:
        parse_scope_map([("soc.yaml", text)])
    return list(err.value.problems)


def _with(extra: str) -> str:
    return DOC.replace("    risk: low\n", "    risk: low\n" + extra)


def test_another_teams_class_is_pointed_at_its_team_line() -> None:
    assert _problems(DOC.replace("      team: soc", "      team: iam")) == [
        "soc.yaml:10: action_classes.enrichment.owner.team: is 'iam', but this file belongs "
        "to team 'soc' (metadata.team): a file may define only its own team's classes; move "
        "the class to that team's file"]


def test_the_description_is_kept() -> None:
    assert parse_scope_map([("soc.yaml", DOC)]).classes["enrichment"].description == (
        "look things up")


def test_federated_approvers_alone_make_a_one_vote_rule_with_the_default_timings() -> None:
    m = parse_scope_map([("soc.yaml", _with(
        "    federated: approval\n    federated_approvers: [vendor-managers]\n"))])
    assert m.classes["enrichment"].federated_approval == ApprovalRule(
        approvers=("vendor-managers",), approvals_required=1, escalate_after_seconds=900,
        expires_seconds=3600, break_glass=None)


def test_approval_with_nobody_to_approve_says_how_to_name_them() -> None:
    assert _problems(_with("    federated: approval\n")) == [
        "soc.yaml:8: action_classes.enrichment.federated: approval needs approvers: give the "
        "class a JIT approval rule (approval: {mode: jit, ...}) or federated_approvers: "
        "[GROUP]"]
    assert _problems(_with("    environments: {default: approval}\n").replace(
        "metadata: {team: soc}\n", "metadata: {team: soc}\nenvironments: [default]\n")) == [
        "soc.yaml:9: action_classes.enrichment.environments: approval needs approvers: give "
        "the class a JIT approval rule (approval: {mode: jit, approvers: [GROUP]}); `allow` "
        "waives it in the environments that say so"]


def test_a_count_that_is_not_a_number_is_a_problem_not_a_crash() -> None:
    assert _problems(_with(
        "    approval: {mode: jit, approvers: [a], approvals_required: many, "
        "escalate_after: 1h, expires: 10m}\n")) == [
        "soc.yaml:8: action_classes.enrichment.approval.approvals_required: must be an integer",
        "soc.yaml:8: action_classes.enrichment.approval.escalate_after: (3600s) must be "
        "shorter than expires (600s), or nobody is escalated to before the request is "
        "auto-denied"]
