"""``credbroker demo``: the walking skeleton's story, told against a real dev stack.

Exit 0 only if every step behaved as the scope map says it must.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions

from broker.adapters.approvers import DevIssuer
from broker.adapters.audit import read_records
from broker.core.auditchain import verify_chain
from broker.core.audittrace import trace, trace_lines
from credbroker_dev.devstack import DevStack
from sidecar.client import SidecarClient, SidecarError

ALERT = {"source": "splunk", "id": "NOTABLE-4242",
         "summary": "beaconing from host ws-0231 to a known C2 domain"}


class _Story:
    def __init__(self) -> None:
        self.n = 0
        self.failed: list[str] = []

    def step(self, title: str, check: Callable[[], str]) -> None:
        self.n += 1
        print(f"\n[{self.n}] {title}")
        try:
            print(f"    ok: {check()}")
        except Exception as exc:  # every failure is reported, then the story goes on
            self.failed.append(title)
            print(f"    NOT AS EXPECTED: {exc}")


def _decision_line(d: dict[str, Any]) -> str:
    owner = d.get("owner") or {}
    return (f"rule {d.get('rule')} ({d.get('source')}), scope map "
            f"{str(d.get('scope_map_version', ''))[:19]}…; owner {owner.get('team')} "
            f"<{owner.get('contact')}>; escalation {' → '.join(d.get('escalation') or [])}")


def _cli(*argv: str) -> str:
    """Run a credbroker command as a responder would, in this process; its output."""
    from broker.cli.main import main as cli_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = cli_main(list(argv))
    if rc != 0:
        raise AssertionError(f"credbroker {argv[0]} exited {rc}: {buffer.getvalue()}")
    return buffer.getvalue()


def run_demo(run_dir: Path) -> int:
    print("credbroker demo — authority comes from the workload's SPIFFE identity, "
          "one action class at a time")
    print(f"starting a dev stack in {run_dir} (OpenBao dev, dev Workload API, broker, "
          "2 sidecars) ...")
    stack = DevStack(run_dir=run_dir)
    stack.start()
    print(f"web console: {stack.console_url} (while the demo runs; `credbroker dev` keeps it "
          "up)\n  dev users: " + ", ".join(f"{u} ({'/'.join(g)})"
                                          for u, g in DevIssuer.USERS.items()))
    try:
        return _story(stack)
    finally:
        stack.stop()
        print("\ndev stack stopped.")


def _story(stack: DevStack) -> int:
    assert stack.bao is not None
    info = json.loads((stack.run_dir / "dev.json").read_text())
    root = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
    root.secrets.kv.v2.create_or_update_secret(
        path="soc/enrichment/threat-intel", secret={"api_key": "demo-threat-intel-key"})
    root.secrets.kv.v2.create_or_update_secret(
        path="soc/containment/edr/api", secret={"api_key": "demo-edr-key"})
    triage = SidecarClient(info["sidecars"]["triage"]["socket"])
    containment = SidecarClient(info["sidecars"]["containment"]["socket"])
    tid = info["sidecars"]["triage"]["spiffe_id"]
    cid = info["sidecars"]["containment"]["spiffe_id"]
    story = _Story()
    held: dict[str, dict[str, Any]] = {}

    def vault_as(token: str) -> hvac.Client:
        return hvac.Client(url=info["vault_addr"], token=token)

    def read(token: str, path: str) -> dict[str, Any]:
        resp = vault_as(token).secrets.kv.v2.read_secret_version(
            path=path, raise_on_deleted_version=False)
        data: dict[str, Any] = resp["data"]["data"]
        return data

    def triage_enrichment() -> str:
        cred = triage.request_credential("enrichment", initiating_event=ALERT,
                                         justification="look up the C2 domain's reputation")
        held["enrichment"] = cred
        return (f"credential {cred['credential_id']} granted, expires {cred['expires_at']}, "
                f"policies {cred['policies']}\n        {_decision_line(cred['decision'])}")

    def read_in_scope() -> str:
        data = read(held["enrichment"]["token"], "soc/enrichment/threat-intel")
        return f"Vault returned the threat-intel secret ({len(data)} key; value not shown)"

    def read_out_of_scope() -> str:
        try:
            read(held["enrichment"]["token"], "soc/containment/edr/api")
        except hvac.exceptions.Forbidden:
            return "Vault refused: permission denied (the enrichment credential cannot touch EDR)"
        raise AssertionError("the enrichment credential could read the EDR secret")

    def triage_containment() -> str:
        try:
            triage.request_credential("containment.isolate_host", target="ws-0231",
                                      initiating_event=ALERT)
        except SidecarError as exc:
            if exc.status == 403:
                return f"denied ({exc.status} {exc.code}): {exc.message}"
            raise AssertionError(f"expected 403, got {exc}") from None
        raise AssertionError("the triage agent was granted containment.isolate_host")

    def containment_asks() -> str:
        status, body = containment.raw("POST", "/v1/credentials", {
            "action_class": "containment.isolate_host", "target": "ws-0231",
            "initiating_event": ALERT,
            "justification": "isolate ws-0231: confirmed beaconing to C2"})
        if status != 202:
            raise AssertionError(f"expected 202 pending approval, got {status} {body}")
        held["approval"] = body
        return (f"202 pending: approval {body['approval_id']} needs "
                f"{body['approvals_required']} of {body['approvers']} (expires "
                f"{body['expires_at']})\n        {_decision_line(body['decision'])}")

    def person_approves() -> str:
        aid = held["approval"]["approval_id"]
        listed = _cli("approvals", "list", "--dev", str(stack.run_dir))
        if aid not in listed:
            raise AssertionError(f"{aid} is not listed as pending:\n{listed}")
        out = _cli("approvals", "approve", aid, "--reason", "confirmed C2 beaconing, isolate",
                   "--as", "alice@example.org", "--dev", str(stack.run_dir))
        return f"credbroker approvals list shows it; alice (ir-leads) approves: {out.strip()}"

    def containment_receives() -> str:
        status, cred = containment.raw(
            "GET", f"/v1/approvals/{held['approval']['approval_id']}?wait=10")
        if status != 200:
            raise AssertionError(f"expected the credential, got {status} {cred}")
        held["isolate"] = cred
        read(cred["token"], "soc/containment/edr/api")
        return (f"credential {cred['credential_id']} delivered to the waiting sidecar, "
                f"approved by {cred['approval']['approved_by']}, used to read the EDR API key")

    def hand_back() -> str:
        out = containment.hand_back(held["isolate"]["credential_id"])
        if not out.get("revoked"):
            raise AssertionError(f"hand-back did not revoke: {out}")
        return f"credential {held['isolate']['credential_id']} revoked in Vault"

    def dead_after_hand_back() -> str:
        try:
            read(held["isolate"]["token"], "soc/containment/edr/api")
        except hvac.exceptions.Forbidden:
            return "Vault refused the handed-back token (permission denied: it no longer exists)"
        raise AssertionError("the handed-back token still works")

    story.step(f"triage agent {tid} asks for `enrichment` for alert "
               f"{ALERT['source']}:{ALERT['id']}", triage_enrichment)
    story.step("it reads its scoped secret secret/soc/enrichment/threat-intel", read_in_scope)
    story.step("it tries the containment secret secret/soc/containment/edr/api with the same "
               "credential", read_out_of_scope)
    story.step("triage agent asks for `containment.isolate_host` on ws-0231", triage_containment)
    story.step(f"containment agent {cid} asks for `containment.isolate_host` on ws-0231",
               containment_asks)
    story.step("an IR lead approves it: `credbroker approvals approve ID --reason ...`",
               person_approves)
    story.step("the containment agent's sidecar receives the credential", containment_receives)
    story.step("containment agent hands the credential back", hand_back)
    story.step("the handed-back token is tried against Vault", dead_after_hand_back)
    def freeze_triage() -> str:
        out = _cli("freeze", "--spiffe-id", tid, "--reason", "demo: triage agent misbehaves",
                   "--yes", "--as", "dave@example.org", "--dev", str(stack.run_dir))
        try:
            read(held["enrichment"]["token"], "soc/enrichment/threat-intel")
        except hvac.exceptions.Forbidden:
            pass
        else:
            raise AssertionError("the frozen agent's credential still works")
        try:
            triage.request_credential("enrichment", target="after-freeze")
        except SidecarError as exc:
            if exc.status != 409:
                raise AssertionError(f"expected 409 frozen, got {exc}") from None
            refused = f"{exc.status} {exc.code}: {exc.message}"
        else:
            raise AssertionError("a frozen agent was issued a credential")
        _cli("unfreeze", "--spiffe-id", tid, "--reason", "demo: contained", "--yes", "--as",
             "dave@example.org", "--dev", str(stack.run_dir))
        again = triage.request_credential("enrichment", target="after-unfreeze")
        acts = [(r["type"], r["by"]) for r in read_records(Path(info["audit_path"]))
                if r["type"] in ("freeze", "unfreeze")]
        if acts != [("freeze", "dave@example.org"), ("unfreeze", "dave@example.org")]:
            raise AssertionError(f"the freeze is not on record as dave's: {acts}")
        return (f"{out.strip()}\n        its enrichment credential is now refused by Vault; it "
                f"asks again: {refused}\n        after `credbroker unfreeze` it is issued "
                f"{again['credential_id']}\n        the audit log records both as "
                "by dave@example.org, the person, not the admin tool's SPIFFE ID")

    def audit_trace() -> str:
        t = trace(read_records(Path(info["audit_path"])), held["isolate"]["credential_id"])
        if t is None:
            raise AssertionError("the audit log has no trace of the containment credential")
        lines = trace_lines(t, datetime.now(UTC))
        text = "\n".join(lines)
        for needed in ("initiating event: splunk NOTABLE-4242", "owner (answers for the policy)",
                       "escalation (should intervene)", "approved by: alice@example.org",
                       "handed back by the workload"):
            if needed not in text:
                raise AssertionError(f"the trace lacks {needed!r}:\n{text}")
        cid = str(held["isolate"]["credential_id"])
        return f"credbroker audit trace {cid}\n      " + "\n      ".join(lines)

    def audit_intact() -> str:
        with Path(info["audit_path"]).open("rb") as f:
            verdict = verify_chain(f)
        if not verdict.ok:
            raise AssertionError(verdict.problem)
        return f"credbroker audit verify: intact, {verdict.records} records"

    story.step("a responder (dave, in group responders) freezes the triage agent: "
               "`credbroker freeze --spiffe-id ... --yes`", freeze_triage)
    story.step("the responder asks the audit log who is accountable for that credential",
               audit_trace)
    story.step("the auditor checks that the log is intact", audit_intact)
    if story.failed:
        print(f"\n{len(story.failed)} of {story.n} steps did NOT behave: "
              + "; ".join(story.failed))
        return 1
    print(f"\nall {story.n} steps behaved as the scope map says.")
    return 0
