"""Environments in the scope map: declared once, named per class, decided by the pure core."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.core.models import CredentialRequest, DenyCode, InitiatingEvent, Outcome
from broker.core.records import request_from_json, request_to_json
from broker.core.scopemap import evaluate, parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import ScopeMapError

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGENT = SpiffeId.parse("spiffe://example.org/agent/triage")
POLICY = "{path: secret/data/x, capabilities: [read]}"
JIT = "    approval: {mode: jit, approvers: [ir-leads]}\n"


def doc(*, declared: str = "environments: [sandbox, production]\n", envs: str = "",
        approval: str = JIT, name: str = "containment.isolate_host") -> str:
    block = f"    environments: {envs}\n" if envs else ""
    return f"""apiVersion: credbroker/v1
kind: ScopeMap
{declared}action_classes:
  {name}:
    risk: low
    owner: {{team: ir, contact: ir@example.org}}
    escalation: [ir-oncall]
    workloads: [{AGENT}]
{approval}{block}    credential: {{ttl: 1m, max_ttl: 2m, vault_policy: [{POLICY}]}}
"""


def decide(text: str, environment: str) -> tuple[Outcome, str, DenyCode | None, str]:
    m = parse_scope_map([("m.yaml", text)])
    d = evaluate(m, AGENT, CredentialRequest(action_class="containment.isolate_host",
                                             environment=environment), NOW)
    return d.outcome, d.rule, d.deny_code, " ".join(d.reasons)


ISOLATE = doc(envs="{sandbox: allow, production: approval}")


def test_the_map_declares_its_environments_in_order() -> None:
    m = parse_scope_map([("m.yaml", ISOLATE)])
    assert m.environments == ("sandbox", "production")
    assert m.classes["containment.isolate_host"].environments == {"sandbox": "allow",
                                                                  "production": "approval"}


def test_allow_waives_the_jit_rule_in_that_environment() -> None:
    outcome, rule, code, why = decide(ISOLATE, "sandbox")
    assert (outcome, code) == (Outcome.ALLOW, None)
    assert rule == "containment.isolate_host.environments.sandbox"
    assert "allowed in environment 'sandbox' without approval " \
           "(rule containment.isolate_host.environments.sandbox)" in why


def test_approval_needs_the_classes_jit_rule_in_that_environment() -> None:
    outcome, rule, code, why = decide(ISOLATE, "production")
    assert (outcome, code) == (Outcome.NEEDS_APPROVAL, None)
    assert rule == "containment.isolate_host.environments.production"
    assert "needs approval in environment 'production'" in why and "ir-leads" in why


def test_deny_denies_with_the_environments_rule() -> None:
    text = doc(envs="{sandbox: allow, production: deny}")
    outcome, rule, code, why = decide(text, "production")
    assert (outcome, code) == (Outcome.DENY, DenyCode.ENVIRONMENT_NOT_ALLOWED)
    assert rule == "containment.isolate_host.environments.production"
    assert "denied in environment 'production'" in why and "may be requested in: sandbox" in why


def test_an_environment_the_block_does_not_name_is_denied() -> None:
    text = doc(envs="{sandbox: allow}")
    outcome, rule, code, _ = decide(text, "production")
    assert (outcome, code, rule) == (Outcome.DENY, DenyCode.ENVIRONMENT_NOT_ALLOWED,
                                     "containment.isolate_host.environments.production")


def test_a_request_naming_no_environment_is_denied_by_a_block() -> None:
    outcome, _, code, why = decide(ISOLATE, "")
    assert (outcome, code) == (Outcome.DENY, DenyCode.ENVIRONMENT_NOT_ALLOWED)
    assert "when the request names no environment" in why


def test_a_class_without_a_block_is_decided_alike_everywhere() -> None:
    text = doc(approval="")
    for env in ("", "sandbox", "production"):
        outcome, _, code, why = decide(text, env)
        assert (outcome, code) == (Outcome.ALLOW, None)
        assert "no approval required (approval: none)" in why
    text = doc()  # its JIT rule applies in every environment
    for env in ("sandbox", "production"):
        assert decide(text, env)[:2] == (Outcome.NEEDS_APPROVAL,
                                         "containment.isolate_host.approval")


def test_allow_without_a_jit_rule_reads_as_before() -> None:
    text = doc(approval="", envs="{sandbox: allow}")
    outcome, _, _, why = decide(text, "sandbox")
    assert outcome is Outcome.ALLOW and "no approval required (approval: none)" in why


def test_a_freeze_and_an_unknown_class_still_come_first() -> None:
    m = parse_scope_map([("m.yaml", doc(envs="{sandbox: deny}"))])
    d = evaluate(m, AGENT, CredentialRequest(action_class="nope", environment="sandbox"), NOW)
    assert d.deny_code is DenyCode.UNKNOWN_ACTION_CLASS


def test_the_other_checks_still_apply_in_an_allowed_environment() -> None:
    text = doc(envs="{sandbox: allow}", approval="    requires: [justification]\n")
    assert decide(text, "sandbox")[2] is DenyCode.MISSING_FIELD


def test_federated_approval_is_not_waived_by_allow() -> None:
    text = doc(envs="{sandbox: allow}").replace(
        "    credential:", "    federated: approval\n    credential:")
    text = text.replace("[spiffe://example.org/agent/triage]",
                        "[spiffe://example.org/agent/triage, spiffe://partner.example/agent/x]")
    m = parse_scope_map([("m.yaml", text)])
    d = evaluate(m, SpiffeId.parse("spiffe://partner.example/agent/x"),
                 CredentialRequest(action_class="containment.isolate_host",
                                   environment="sandbox"), NOW,
                 federated_from="partner.example")
    assert d.outcome is Outcome.NEEDS_APPROVAL and d.rule == "containment.isolate_host.federated"


@pytest.mark.parametrize(("text", "expected"), [
    (doc(envs="{sandbx: allow, production: approval}"),
     "m.yaml:11: action_classes.containment.isolate_host.environments.sandbx: 'sandbx' is "
     "not an environment the scope map declares (sandbox, production); did you mean "
     "'sandbox'?"),
    (doc(declared="", envs="{sandbox: allow}"),
     "names environment 'sandbox', but the scope map declares no environments: add "
     "`environments: [sandbox]`"),
    (doc(approval="", envs="{production: approval}"),
     "action_classes.containment.isolate_host.environments: approval needs approvers"),
    (doc(envs="{sandbox: maybe}"),
     "action_classes.containment.isolate_host.environments.sandbox: is 'maybe'; expected one "
     "of allow, approval, deny"),
    (doc(declared="environments: [Prod]\n"),
     "environments[0]: 'Prod' is not of the expected form: an environment name"),
])
def test_lint_catches_bad_environments(text: str, expected: str) -> None:
    with pytest.raises(ScopeMapError) as err:
        parse_scope_map([("m.yaml", text)])
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_declarations_of_every_document_count() -> None:
    other = ("apiVersion: credbroker/v1\nkind: ScopeMap\nenvironments: [staging]\n"
             "action_classes: {}\n")
    m = parse_scope_map([("a.yaml", doc(envs="{staging: allow}")), ("b.yaml", other)])
    assert m.environments == ("sandbox", "production", "staging")


def test_in_environment_keeps_the_classes_minted_there() -> None:
    text = doc(envs="{sandbox: allow, production: deny}") + """  enrichment:
    risk: low
    owner: {team: soc, contact: soc@example.org}
    escalation: [soc]
    workloads: [spiffe://example.org/agent/triage]
    credential: {ttl: 1m, max_ttl: 2m, vault_policy: [{path: secret/data/e, capabilities: [read]}]}
"""
    m = parse_scope_map([("m.yaml", text)])
    assert set(m.in_environment("sandbox").classes) == {"containment.isolate_host", "enrichment"}
    assert set(m.in_environment("production").classes) == {"enrichment"}


def test_the_environment_is_bound_into_the_request_record() -> None:
    req = CredentialRequest(action_class="a", environment="sandbox",
                            initiating_event=InitiatingEvent(source="s", id="1"))
    assert request_to_json(req)["environment"] == "sandbox"
    assert request_from_json(request_to_json(req), "x") == req
    plain = CredentialRequest(action_class="a")
    assert "environment" not in request_to_json(plain)  # as before environments existed
