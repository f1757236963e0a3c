"""`audit trace` tells how a credential ended; OCSF maps every responder action; wrong files
are refused. The log is written with the real AuditLog, in the shapes the broker writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.audit import AuditLog, read_records
from broker.cli.main import main
from broker.core.audittrace import to_ocsf

TRIAGE = "spiffe://example.org/agent/triage"
CONTAINMENT = "spiffe://example.org/agent/containment"
ADMIN = "spiffe://example.org/credbroker/admin"


def z(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def minted(log: AuditLog, n: int, cls: str = "enrichment", who: str = TRIAGE) -> str:
    rid, cid = f"req-{n}", f"acc{n}"
    log.append("decision", request_id=rid, spiffe_id=who,
               request={"action_class": cls, "target": "h", "initiating_event": None,
                        "justification": "", "ttl_seconds": 0},
               decision={"outcome": "allow", "rule": "r", "scope_map_version": "sha256:x"})
    log.append("credential.minted", request_id=rid, credential_id=cid, spiffe_id=who,
               action_class=cls, target="h", policies=[f"credbroker-{cls}"], ttl_seconds=600,
               expires_at=z(datetime.now(UTC) + timedelta(minutes=10)))
    return cid


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    a = AuditLog(path)
    a.append("broker.started", spiffe_id="spiffe://example.org/credbroker/broker")
    bulk, untouched = minted(a, 0), minted(a, 1)
    failed = minted(a, 2, who=CONTAINMENT)
    a.append("credentials.revoked", by=ADMIN, reason="incident 7",
             selector=f"spiffe_id={TRIAGE}", credential_ids=[bulk, failed],
             counts={"revoked": 1, "already_dead": 0, "pending": 0, "failed": 1},
             failed_ids=[failed])
    iso = minted(a, 9, "containment.isolate_host", who=CONTAINMENT)
    a.append("freeze", freeze_id="fz1", kind="action_class",
             pattern="containment.isolate_host", reason="bad playbook", by=ADMIN,
             credentials_matched=1, vault_entities_disabled=[], vault_policy_frozen=True,
             vault_enforced_ms=3.2, vault_error="")
    a.append("credentials.revoked", by=ADMIN, reason="bad playbook", selector="freeze fz1",
             credential_ids=[iso], counts={"revoked": 1, "already_dead": 0, "pending": 0,
                                           "failed": 0}, failed_ids=[])
    a.append("freeze", freeze_id="fz2", kind="spiffe_id", pattern=TRIAGE, reason="rogue",
             by=ADMIN, credentials_matched=0, vault_entities_disabled=["e1"],
             vault_policy_frozen=False, vault_enforced_ms=2.0, vault_error="")
    a.append("unfreeze", kind="spiffe_id", pattern=TRIAGE, reason="contained", by=ADMIN)
    a.close()
    (tmp_path / "ids.json").write_text(json.dumps([bulk, failed, untouched, iso]))
    return path


def ids(log: Path) -> list[str]:
    out: list[str] = json.loads((log.parent / "ids.json").read_text())
    return out


def trace(capsys: pytest.CaptureFixture[str], log: Path, ident: str, *more: str) -> str:
    assert main(["audit", "trace", ident, "--log", str(log), *more]) == 0
    return capsys.readouterr().out


def test_trace_shows_the_bulk_revocation_that_ended_a_credential(
        log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bulk, failed, *_ = ids(log)
    text = trace(capsys, log, bulk)
    assert f"revoked in a bulk revocation by {ADMIN}" in text
    assert f"selector spiffe_id={TRIAGE}; 2 credential(s)): incident 7" in text
    assert "still live" not in text
    ended = json.loads(trace(capsys, log, bulk, "--json"))["ended"]
    assert [(e["how"], e["by"], e["reason"], e["credential_id"]) for e in ended[:1]] == [
        ("revoked", ADMIN, "incident 7", bulk)]
    # A revocation that failed for it does not pass for an ending.
    text = trace(capsys, log, failed)
    assert "revocation FAILED for it in a bulk revocation" in text
    assert "still live until" in text and "its revocation failed" in text


def test_trace_shows_the_freeze_that_ended_a_credential(
        log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bulk, _, untouched, iso = ids(log)
    text = trace(capsys, log, iso)
    assert (f"frozen by {ADMIN} at" in text and "(freeze fz1 of action class "
            "containment.isolate_host); Vault refused it from then on: bad playbook" in text)
    assert "revoked in a bulk revocation" in text and "selector freeze fz1" in text
    ended = json.loads(trace(capsys, log, iso, "--json"))["ended"]
    assert [e["how"] for e in ended] == ["frozen", "revoked"]
    assert ended[1]["freeze"] == {"kind": "action_class", "pattern": "containment.isolate_host"}
    # The identity freeze caught the triage credential still live then, and only that one.
    assert "freeze fz2 of identities matching " + TRIAGE in trace(capsys, log, untouched)
    assert "fz2" not in trace(capsys, log, bulk)


def test_ocsf_maps_freeze_unfreeze_and_bulk_revocation(
        log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "export", "--format", "ocsf", "--log", str(log)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {(e["unmapped"]["type"], e["unmapped"].get("kind"), e["class_uid"], e["activity_id"],
            e["activity_name"]) for e in events}
    assert ("credentials.revoked", None, 3005, 2, "Revoke Privileges") in got
    assert ("freeze", "action_class", 3005, 2, "Revoke Privileges") in got
    assert ("freeze", "spiffe_id", 3001, 5, "Disable") in got
    assert ("unfreeze", "spiffe_id", 3001, 2, "Enable") in got
    assert all(e["class_uid"] != 6002 for e in events if e["unmapped"]["type"] != "broker.started")
    fz = next(e for e in events if e["unmapped"]["type"] == "freeze")
    assert fz["actor"]["user"]["uid"] == ADMIN
    assert fz["privileges"] == ["credbroker-containment.isolate_host"]
    assert fz["type_uid"] == 300502
    bulk = next(e for e in events if e["unmapped"]["type"] == "credentials.revoked")
    assert bulk["status"] == "Failure" and "failed 1" in bulk["message"]
    unfreeze_class = to_ocsf({"type": "unfreeze", "kind": "action_class", "pattern": "x",
                              "by": ADMIN, "reason": "ok", "time": "2026-11-27T00:00:00Z"})
    assert (unfreeze_class["class_uid"], unfreeze_class["activity_id"]) == (3005, 1)


def test_refused_acts_export_as_failed_access_management_by_who_tried() -> None:
    responder = to_ocsf({"type": "responder.refused", "act": "freeze",
                         "target": "action class enrichment", "by": "carol@example.org",
                         "error": "carol@example.org may not freeze", "time":
                         "2026-11-27T00:00:00Z"})
    assert (responder["class_uid"], responder["activity_id"], responder["status"]) == (
        3005, 99, "Failure")
    assert responder["actor"]["user"]["uid"] == "carol@example.org"
    assert responder["message"] == ("carol@example.org was refused: freeze action class "
                                    "enrichment: carol@example.org may not freeze")
    approval = to_ocsf({"type": "approval.refused", "act": "approve", "approval_id": "ap-1",
                        "by": "dave@example.org", "error": "in none of the groups",
                        "spiffe_id": TRIAGE, "time": "2026-11-27T00:00:00Z"})
    assert (approval["class_uid"], approval["status_id"]) == (3005, 2)
    assert approval["actor"]["user"]["uid"] == "dave@example.org"
    assert approval["message"] == ("dave@example.org was refused: approve approval ap-1: "
                                   "in none of the groups")


@pytest.mark.parametrize("fmt", ["ocsf", "jsonl"])
def test_an_export_fed_back_is_refused_with_a_clear_error(
        fmt: str, log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "export", "--format", fmt, "--log", str(log)]) == 0
    exported = tmp_path / f"export.{fmt}"
    exported.write_text(capsys.readouterr().out)
    what = "an OCSF export" if fmt == "ocsf" else "a JSONL export"
    for argv in (["audit", "trace", "acc0", "--log", str(exported)],
                 ["audit", "export", "--log", str(exported)],
                 ["audit", "verify", str(exported)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{exported} is {what}" in err and "not the audit log" in err, err
    scope_map = Path(__file__).parents[2] / "data" / "test-scope-map.yaml"
    rc = main(["scope", "replay", str(scope_map), "--audit", str(exported)])
    err = capsys.readouterr().err
    if fmt == "ocsf":  # replayed 0 records and said nothing wrong, before
        assert rc == 2 and f"{exported}:1 is an OCSF export" in err and "not an audit record" in err
    else:  # a JSONL export is what replay reads
        assert rc == 0, err


def test_export_since_takes_a_duration(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "export", "--log", str(log), "--since", "1h"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(list(read_records(log)))
    assert main(["audit", "export", "--log", str(log), "--since", "2026-11-27T00:00:00"]) == 2
    assert "is not a time; write a duration" in capsys.readouterr().err


def test_trace_lists_every_request_a_credential_served(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    a = AuditLog(path)
    cid = minted(a, 5)
    for n, rid in enumerate(("hit-1", "hit-2", "hit-1")):  # hit-1 reported twice: once
        a.append("credential.reused", request_id=rid, credential_id=cid,
                 minted_request_id="req-5", spiffe_id=TRIAGE, action_class="enrichment",
                 target="h", request={"action_class": "enrichment", "target": "h",
                                      "initiating_event": {"source": "splunk", "id": "N-9",
                                                           "summary": ""},
                                      "justification": "same again", "ttl_seconds": 0},
                 served_at=f"2026-11-27T12:00:0{n}Z", proof={"x509_serial": "1"})
    a.close()
    for ident in (cid, "req-5", "hit-2"):  # a reuse's request id leads to the same trace
        text = trace(capsys, path, ident)
        assert "Accountability trace for request req-5" in text
        assert "served 3 requests:" in text
        assert "minted for request req-5; event: none; justification: none" in text
        assert ("2026-11-27T12:00:01Z reused from the sidecar cache for request hit-2; "
                "event: splunk N-9; justification: same again") in text
        assert text.count("request hit-1") == 1
    served = json.loads(trace(capsys, path, cid, "--json"))["served"]
    assert [(s["how"], s["request_id"]) for s in served] == [
        ("minted", "req-5"), ("reused", "hit-1"), ("reused", "hit-2")]
    assert served[2]["initiating_event"]["id"] == "N-9"
    assert served[2]["justification"] == "same again"
    assert served[2]["time"] == "2026-11-27T12:00:01Z"
    ocsf = to_ocsf(next(r for r in read_records(path) if r["type"] == "credential.reused"))
    assert (ocsf["class_uid"], ocsf["activity_id"]) == (3003, 99)
    assert ocsf["metadata"]["correlation_uid"] == "hit-1" and "reused" in ocsf["message"]
