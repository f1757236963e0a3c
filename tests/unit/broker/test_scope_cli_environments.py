"""`credbroker scope lint | explain | diff | test` with environments (files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli.main import main

MAP = Path(__file__).parents[2] / "data" / "environments-map.yaml"
CONTAINMENT = "spiffe://example.org/agent/containment"
EXPLAIN = ("scope", "explain", str(MAP), "--spiffe-id", CONTAINMENT, "--action-class",
           "containment.isolate_host", "--event", "splunk:N-1")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_lint_shows_each_classes_outcome_per_environment(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "scope", "lint", str(MAP))
    assert rc == 0 and "OK: 3 action classes, environments production, sandbox" in out
    assert "  containment.isolate_host: production approval, sandbox allow" in out
    assert "  enrichment: production deny, sandbox allow" in out
    rc, out, _ = run(capsys, "scope", "lint", "--json", str(MAP))
    envs = json.loads(out)["environments"]
    assert envs["declared"] == ["production", "sandbox"]
    assert envs["classes"]["ticket.comment"] == {"production": "allow", "sandbox": "allow"}


def test_lint_catches_a_typoed_environment(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MAP.read_text().replace("{sandbox: allow, production: approval}",
                                           "{sandbox: allow, prodution: approval}"))
    rc, out, _ = run(capsys, "scope", "lint", str(bad))
    assert rc == 1
    assert (f"{bad}:19: action_classes.containment.isolate_host.environments.prodution: "
            "'prodution' is not an environment the scope map declares (production, sandbox); "
            "did you mean 'production'?") in out


def test_explain_shows_every_environments_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, *EXPLAIN)
    assert rc == 0
    assert ("per environment:\n"
            "  production: NEEDS APPROVAL (rule containment.isolate_host.environments.production)\n"
            "  sandbox: ALLOW (rule containment.isolate_host.environments.sandbox)\n") in out
    assert "environment: production" in out and "environment: sandbox" in out
    rc, out, _ = run(capsys, *EXPLAIN, "--json")
    envs = json.loads(out)["environments"]
    assert envs["sandbox"]["outcome"] == "allow"
    assert envs["production"]["outcome"] == "needs_approval"


def test_explain_one_environment_and_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "scope", "explain", str(MAP), "--spiffe-id",
                     "spiffe://example.org/agent/triage", "--action-class", "enrichment",
                     "--environment", "production")
    assert rc == 0 and "decision:   DENY (environment_not_allowed)" in out
    assert "rule:       enrichment.environments.production" in out
    assert "per environment" not in out
    rc, _, err = run(capsys, *EXPLAIN, "--environment", "staging")
    assert rc == 2 and "--environment 'staging': the scope map declares only production, " \
                       "sandbox" in err


def test_diff_marks_an_environment_opened_as_widening(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(MAP.read_text().replace("{sandbox: allow, production: deny}",
                                           "{sandbox: allow, production: allow}"))
    rc, out, _ = run(capsys, "scope", "diff", "--fail-on", "widen", str(MAP), str(new))
    assert rc == 1
    assert "+ enrichment: environment production: deny → allow" in out


def test_cases_may_name_the_environment(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - name: isolation is free in the sandbox\n"
        f"    spiffe_id: {CONTAINMENT}\n"
        "    request: {action_class: containment.isolate_host, environment: sandbox,\n"
        "              initiating_event: {source: s, id: '1'}}\n"
        "    expect: {outcome: allow}\n"
        "  - name: and approved in production\n"
        f"    spiffe_id: {CONTAINMENT}\n"
        "    request: {action_class: containment.isolate_host, environment: production,\n"
        "              initiating_event: {source: s, id: '1'}}\n"
        "    expect: {outcome: needs_approval,\n"
        "             rule: containment.isolate_host.environments.production}\n")
    rc, out, _ = run(capsys, "scope", "test", str(MAP), str(cases))
    assert rc == 0, out
