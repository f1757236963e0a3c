"""`credbroker scope ...` end to end on files (no servers needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.cli.main import main
from broker.config import load_scope_map
from broker.core.models import CredentialRequest, InitiatingEvent
from broker.core.records import decision_record
from broker.core.scopemap import evaluate
from broker.core.spiffeid import SpiffeId

EXAMPLES = Path(__file__).parents[3] / "broker" / "examples"
SOC = EXAMPLES / "soc-scope-map.yaml"
FULL = EXAMPLES / "soc-full"
TRIAGE = "spiffe://example.org/agent/triage"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_lint_ok_and_every_problem_at_once(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "scope", "lint", str(FULL))
    assert rc == 0 and "OK: 4 action classes" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(SOC.read_text().replace("risk: low", "risk: tiny")
                   .replace("    owner: {team: incident-response, contact: ir-lead@example.org}\n",
                            ""))
    rc, out, _ = run(capsys, "scope", "lint", str(bad))
    assert rc == 1
    assert f"{bad}:12: action_classes.enrichment.risk: is 'tiny'" in out
    assert "action_classes.containment.isolate_host.owner: is required" in out
    assert "2 problem(s)" in out
    rc, out, _ = run(capsys, "scope", "lint", str(bad), "--json")
    assert rc == 1 and len(json.loads(out)["problems"]) == 2


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "scope", "explain", str(SOC), "--spiffe-id", TRIAGE,
                     "--action-class", "enrichment", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["outcome"] == "allow" and d["rule"] == "enrichment.workloads[0]"
    assert d["owner"]["team"] == "soc-platform"
    rc, out, _ = run(capsys, "scope", "explain", str(SOC), "--spiffe-id",
                     "spiffe://example.org/agent/containment", "--action-class",
                     "containment.isolate_host", "--event", "splunk:N-1", "--target", "ws-1")
    assert rc == 0 and "decision:   NEEDS APPROVAL" in out and "escalation: ir-oncall → " in out
    assert "1 approval(s) from ir-leads" in out
    rc, _, err = run(capsys, "scope", "explain", str(SOC), "--spiffe-id", "spiffe://Bad/x",
                     "--action-class", "enrichment")
    assert rc == 2 and "lower-case" in err
    rc, _, err = run(capsys, "scope", "explain", str(SOC), "--spiffe-id", TRIAGE,
                     "--action-class", "enrichment", "--event", "nocolon")
    assert rc == 2 and "SOURCE:ID" in err


def test_test_passes_and_fails_with_a_readable_diff(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "scope", "test", str(FULL), str(EXAMPLES / "soc-full.tests.yaml"))
    assert rc == 0 and "9 of 9 cases pass" in out
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - name: wrong on purpose\n"
        f"    spiffe_id: {TRIAGE}\n"
        "    request: {action_class: containment.isolate_host}\n"
        "    expect: {outcome: allow, rule: 'containment.isolate_host.workloads[0]'}\n")
    rc, out, _ = run(capsys, "scope", "test", str(SOC), str(cases))
    assert rc == 1
    assert "FAIL  wrong on purpose" in out
    assert "outcome: expected 'allow', got 'deny'" in out
    assert "0 of 1 cases pass" in out
    cases.write_text("cases:\n  - name: x\n    spiffe_id: spiffe://example.org/a\n"
                     "    request: {action_class: enrichment}\n    expect: {result: allow}\n")
    rc, _, err = run(capsys, "scope", "test", str(SOC), str(cases))
    assert rc == 2 and "case 'x'" in err and "outcome" in err


def test_diff_shows_the_blast_radius(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(SOC.read_text()
                   .replace("      - spiffe://example.org/agent/containment\n    credential:\n"
                            "      ttl: 5m\n      max_ttl: 10m",
                            "      - spiffe://example.org/agent/containment\n"
                            "      - spiffe://example.org/agent/*\n    credential:\n"
                            "      ttl: 5m\n      max_ttl: 30m", 1)
                   .replace("team: identity-security", "team: iam"))
    rc, out, _ = run(capsys, "scope", "diff", str(SOC), str(new))
    assert rc == 0
    assert "+ containment.isolate_host: workloads gained: spiffe://example.org/agent/*" in out
    assert "+ containment.isolate_host: max ttl: 600s → 1800s" in out
    assert "~ identity.disable_account: owner (review): identity-security" in out
    assert "spiffe://example.org/agent/*\n    + containment.isolate_host (destructive)" in out
    rc, out, _ = run(capsys, "scope", "diff", str(SOC), str(new), "--json")
    changes = json.loads(out)["changes"]
    assert {c["kind"] for c in changes} == {"workloads_gained", "max_ttl", "owner"}
    assert {c["kind"]: (c["effect"], c["widens"]) for c in changes}["owner"] == ("review", False)
    rc, out, _ = run(capsys, "scope", "diff", str(SOC), str(SOC))
    assert "no changes" in out


def test_replay_lists_requests_whose_outcome_would_change(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    old = load_scope_map(SOC)
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    lines = []
    for i, (who, cls) in enumerate([(TRIAGE, "enrichment"),
                                    ("spiffe://example.org/agent/containment",
                                     "containment.isolate_host"),
                                    (TRIAGE, "containment.isolate_host")]):
        sid = SpiffeId.parse(who)
        req = CredentialRequest(action_class=cls, target="ws-1",
                                initiating_event=InitiatingEvent(source="splunk", id="N"))
        lines.append(json.dumps(decision_record(time=now, request_id=f"r{i}", spiffe_id=sid,
                                                request=req,
                                                decision=evaluate(old, sid, req, now))))
    lines.append(json.dumps({"type": "credential.minted", "credential_id": "x"}))
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join(lines) + "\n")
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(SOC.read_text().replace(
        "      - spiffe://example.org/agent/triage\n      - spiffe://example.org/agent/containment",
        "      - spiffe://example.org/agent/containment", 1))
    rc, out, _ = run(capsys, "scope", "replay", str(candidate), "--audit", str(audit))
    assert rc == 0
    assert "r0  spiffe://example.org/agent/triage  enrichment on ws-1: allow → deny" in out
    assert "3 recorded request(s) replayed" in out and "1 would be decided differently" in out
    rc, out, _ = run(capsys, "scope", "replay", str(candidate), "--audit", str(audit), "--json")
    assert [c["request_id"] for c in json.loads(out)["changed"]] == ["r0"]
    audit.write_text('{"type": "decision", "time": "yesterday"}\n')
    rc, _, err = run(capsys, "scope", "replay", str(SOC), "--audit", str(audit))
    assert rc == 2 and f"{audit}:1" in err


def test_lint_refuses_vault_control_plane_paths_and_honours_the_allow_list(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDBROKER_VAULT_ALLOWED_MOUNTS", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(SOC.read_text().replace("secret/data/soc/enrichment/*", "sys/policies/acl/*"))
    rc, out, _ = run(capsys, "scope", "lint", str(bad))
    assert rc == 1
    assert (f"{bad}:22: action_classes.enrichment.credential.vault_policy[0].path: "
            "'sys/policies/acl/*' could reach Vault's control plane: sys/ (policies, mounts, "
            "audit devices), including other classes' credbroker-* policies and token roles; "
            "write a path under an allowed mount (secret/), e.g. secret/data/<team>/*") in out
    assert "1 problem(s)" in out
    # no allow-list admits the control plane; the error is a usage error (exit 2)
    rc, _, err = run(capsys, "scope", "lint", str(bad), "--vault-allowed-mount", "sys")
    assert rc == 2 and "can never be allowed" in err

    kv = tmp_path / "kv.yaml"
    kv.write_text(SOC.read_text().replace("secret/data/soc/enrichment/*", "kv/data/soc/*"))
    rc, out, _ = run(capsys, "scope", "lint", str(kv))
    assert rc == 1 and f"{kv}:22: " in out and "outside the allowed Vault mounts (secret/)" in out
    assert "--vault-allowed-mount" in out
    rc, out, _ = run(capsys, "scope", "lint", str(kv), "--vault-allowed-mount", "secret",
                     "--vault-allowed-mount", "kv")
    assert rc == 0 and out.startswith("OK: 3 action classes")
    # explain and test load maps under the same allow-list as lint and the broker
    rc, _, err = run(capsys, "scope", "explain", str(kv), "--spiffe-id", TRIAGE,
                     "--action-class", "enrichment")
    assert rc == 2 and "outside the allowed Vault mounts" in err
    monkeypatch.setenv("CREDBROKER_VAULT_ALLOWED_MOUNTS", "secret,kv")
    rc, out, _ = run(capsys, "scope", "explain", str(kv), "--spiffe-id", TRIAGE,
                     "--action-class", "enrichment", "--json")
    assert rc == 0 and json.loads(out)["outcome"] == "allow"
    rc, out, _ = run(capsys, "scope", "lint", str(kv), "--vault-allowed-mount", "kv")
    assert rc == 1 and "(kv/)" in out  # the flag wins over the environment


# --- issue #11: findings from using the tools ----------------------------------------


def test_lint_reports_a_mistyped_condition_naming_the_fields_that_exist(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SOC.read_text().replace(
        "    approval: none\n",
        "    approval: none\n    when: request.initiating_event.sorce == \"splunk\"\n", 1))
    rc, out, _ = run(capsys, "scope", "lint", str(bad))
    assert rc == 1
    assert (f"{bad}:25: action_classes.enrichment.when: request.initiating_event.sorce is not "
            "a field (did you mean request.initiating_event.source?); the fields that exist are "
            "request.initiating_event.source, request.initiating_event.id, "
            "request.initiating_event.summary") in out
    bad.write_text(SOC.read_text().replace(
        "    approval: none\n", "    approval: none\n    when: request.ttl_seconds\n", 1))
    rc, out, _ = run(capsys, "scope", "lint", str(bad), "--json")
    assert rc == 1
    [problem] = json.loads(out)["problems"]
    assert problem.startswith(f"{bad}:25: action_classes.enrichment.when: must be true or false")


def test_lint_names_tabs_in_the_indentation(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    bad = tmp_path / "tabs.yaml"
    bad.write_text(SOC.read_text().replace("    risk: low\n", "\trisk: low\n", 1))
    rc, out, _ = run(capsys, "scope", "lint", str(bad))
    assert rc == 1
    assert f"{bad}:12: YAML does not allow tabs for indentation; use spaces" in out


def test_diff_shows_a_new_target_restriction_as_narrowing_and_fails_on_widening(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    narrowed = tmp_path / "narrowed.yaml"
    narrowed.write_text(SOC.read_text().replace(
        "    approval: none\n", "    approval: none\n    targets: [\"ws-*\"]\n", 1))
    rc, out, err = run(capsys, "scope", "diff", str(SOC), str(narrowed), "--fail-on", "widen")
    assert rc == 0, err
    assert "- enrichment: targets restricted: any target → ws-*" in out
    assert "targets gained" not in out
    # the reverse widens, and the CI gate fails on it, in text and in JSON
    rc, out, err = run(capsys, "scope", "diff", str(narrowed), str(SOC), "--fail-on", "widen")
    assert rc == 1
    assert "+ enrichment: targets unrestricted: ws-* → any target" in out
    assert "failing (--fail-on widen): 1 change(s) widen" in err
    rc, out, _ = run(capsys, "scope", "diff", str(narrowed), str(SOC), "--fail-on", "widen",
                     "--json")
    assert rc == 1 and [c["effect"] for c in json.loads(out)["changes"]] == ["widens"]
    rc, _, _ = run(capsys, "scope", "diff", str(narrowed), str(SOC))
    assert rc == 0  # without --fail-on, diff reports and succeeds
    rc, _, _ = run(capsys, "scope", "diff", str(SOC), str(narrowed), "--fail-on", "change")
    assert rc == 1
    rc, _, _ = run(capsys, "scope", "diff", str(SOC), str(SOC), "--fail-on", "change")
    assert rc == 0


def _audit(tmp_path: Path) -> Path:
    old = load_scope_map(SOC)
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    lines = []
    for i, (who, cls) in enumerate([(TRIAGE, "enrichment"),
                                    (TRIAGE, "containment.isolate_host")]):
        sid = SpiffeId.parse(who)
        req = CredentialRequest(action_class=cls, target="ws-1",
                                initiating_event=InitiatingEvent(source="splunk", id="N"))
        lines.append(json.dumps(decision_record(time=now, request_id=f"r{i}", spiffe_id=sid,
                                                request=req,
                                                decision=evaluate(old, sid, req, now))))
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join(lines) + "\n")
    return audit


def test_replay_fails_on_change_or_on_widening_for_ci(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    audit = _audit(tmp_path)
    rc, out, _ = run(capsys, "scope", "replay", str(SOC), "--audit", str(audit),
                     "--fail-on", "change")
    assert rc == 0 and "0 would be decided differently" in out
    narrower = tmp_path / "narrower.yaml"
    narrower.write_text(SOC.read_text().replace(
        "      - spiffe://example.org/agent/triage\n      - spiffe://example.org/agent/containment",
        "      - spiffe://example.org/agent/containment", 1))
    rc, _, err = run(capsys, "scope", "replay", str(narrower), "--audit", str(audit),
                     "--fail-on", "change")
    assert rc == 1 and "failing (--fail-on change)" in err
    rc, _, _ = run(capsys, "scope", "replay", str(narrower), "--audit", str(audit),
                   "--fail-on", "change", "--json")
    assert rc == 1
    rc, _, _ = run(capsys, "scope", "replay", str(narrower), "--audit", str(audit),
                   "--fail-on", "widen")
    assert rc == 0  # allow → deny is a change, not a widening
    wider = tmp_path / "wider.yaml"
    wider.write_text(SOC.read_text().replace(
        "    workloads:\n      - spiffe://example.org/agent/containment\n    credential:\n"
        "      ttl: 5m\n      max_ttl: 10m",
        "    workloads:\n      - spiffe://example.org/agent/*\n    credential:\n"
        "      ttl: 5m\n      max_ttl: 10m", 1))
    rc, out, _ = run(capsys, "scope", "replay", str(wider), "--audit", str(audit),
                     "--fail-on", "widen")
    assert rc == 1
    assert "r1  spiffe://example.org/agent/triage  containment.isolate_host on ws-1: " \
        "deny → needs_approval" in out and "1 more permissively" in out
    # an audit file without decisions replays nothing, and says so
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"type": "credential.minted", "credential_id": "x"}) + "\n")
    rc, _, err = run(capsys, "scope", "replay", str(SOC), "--audit", str(empty))
    assert rc == 0 and "holds no decision records; nothing was replayed" in err


def test_scope_test_writes_junit_xml(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    report = tmp_path / "report.xml"
    rc, _, _ = run(capsys, "scope", "test", str(FULL), str(EXAMPLES / "soc-full.tests.yaml"),
                   "--junit", str(report))
    assert rc == 0
    root = ET.parse(report).getroot()  # noqa: S314 - the report we just wrote
    assert root.get("tests") == "9" and root.get("failures") == "0"
    assert len(root.findall("testsuite/testcase")) == 9
    assert not root.findall(".//failure")
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - name: wrong on purpose\n"
        f"    spiffe_id: {TRIAGE}\n"
        "    request: {action_class: containment.isolate_host}\n"
        "    expect: {outcome: allow}\n"
        "  - name: right\n"
        f"    spiffe_id: {TRIAGE}\n"
        "    request: {action_class: enrichment}\n"
        "    expect: {outcome: allow}\n")
    rc, out, _ = run(capsys, "scope", "test", str(SOC), str(cases), "--junit", str(report),
                     "--json")
    assert rc == 1 and json.loads(out)["failed"] == 1  # --json and --junit together
    root = ET.parse(report).getroot()  # noqa: S314 - the report we just wrote
    [failed] = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed.get("name") == "wrong on purpose"
    failure = failed.find("failure")
    assert failure is not None
    assert failure.get("message") == "outcome: expected 'allow', got 'deny'"
    rc, _, err = run(capsys, "scope", "test", str(SOC), str(cases), "--junit",
                     str(tmp_path / "no" / "such" / "dir.xml"))
    assert rc == 2 and "cannot write --junit" in err
