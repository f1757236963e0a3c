"""The audit log as the real broker writes it: events, secrets, trace, export, fail-closed."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import AuditLog, read_records
from broker.cli.main import main
from broker.core.spiffeid import SpiffeId
from broker.errors import AuditError
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    CONTAINMENT,
    TEST_MAP,
    TRIAGE,
    Identity,
    broker_config,
    live_accessors,
)
from tests.integration.helpers import EVENT, issue_request, pem_pair, stub, svid


@pytest.fixture(scope="module")
def flow(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
         short_tmp: Path) -> Iterator[dict[str, object]]:
    """A broker that went through every kind of event, then stopped."""
    scope = short_tmp / "flow-map.yaml"
    shutil.copy(TEST_MAP, scope)
    cfg = broker_config(bao, identity, scope_map_path=scope, reload_interval=0)
    server = BrokerServer(cfg)
    server.start()
    client = svid(identity.ca, CONTAINMENT)
    s = stub(server.port, identity.ca, client)
    token = identity.ca.issue_jwt(SpiffeId.parse(CONTAINMENT), ["credbroker"],
                                  now=datetime.now(UTC), ttl=timedelta(minutes=5))
    ok = s.IssueCredential(issue_request(
        "containment.isolate_host", target="ws-9", initiating_event=EVENT,
        justification="isolate ws-9: confirmed C2", request_id="req-flow-1"),
        metadata=[("authorization", f"Bearer {token}")], timeout=10)
    with pytest.raises(grpc.RpcError):
        stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request("containment.isolate_host", target="ws-9", initiating_event=EVENT,
                          request_id="req-flow-2"), timeout=10)
    s.RevokeCredential(pb.RevokeCredentialRequest(credential_id=ok.credential.credential_id,
                                                  reason="done isolating"), timeout=10)
    scope.write_text(TEST_MAP.read_text().replace("ttl: 2m", "ttl: 90s", 1))
    assert server.reload()
    scope.write_text("apiVersion: credbroker/v1\nkind: ScopeMap\naction_classes: {}\n")
    assert not server.reload()
    server.checkpoint()
    server.stop(grace=0)
    yield {"cfg": cfg, "ok": ok, "token": ok.credential.token, "client": client, "jwt": token}


def test_every_event_type_is_recorded_with_who_why_and_proof(flow: dict[str, object]) -> None:
    cfg = flow["cfg"]
    records = list(read_records(cfg.audit_path))  # type: ignore[attr-defined]
    types = [r["type"] for r in records]
    for t in ("broker.started", "scope_map.loaded", "decision", "credential.minted",
              "credential.revoked", "scope_map.rejected", "broker.stopped"):
        assert t in types, types
    assert types.count("scope_map.loaded") == 2
    allow = next(r for r in records if r.get("request_id") == "req-flow-1"
                 and r["type"] == "decision")
    assert allow["spiffe_id"] == CONTAINMENT
    assert allow["proof"]["x509_serial"] and allow["proof"]["jwt_id"]
    assert allow["request"]["initiating_event"] == {"source": "splunk", "id": "NOTABLE-1",
                                                    "summary": "beaconing"}
    assert allow["request"]["justification"] == "isolate ws-9: confirmed C2"
    assert allow["decision"]["owner"]["team"] == "incident-response"
    assert allow["decision"]["escalation"] == ["ir-oncall", "incident-commander"]
    assert allow["decision"]["scope_map_version"].startswith("sha256:")
    deny = next(r for r in records if r.get("request_id") == "req-flow-2")
    assert deny["decision"]["outcome"] == "deny" and deny["spiffe_id"] == TRIAGE
    minted = next(r for r in records if r["type"] == "credential.minted")
    ok = flow["ok"]
    assert minted["credential_id"] == ok.credential.credential_id  # type: ignore[attr-defined]
    assert minted["policies"] == ["credbroker-containment.isolate_host"]
    revoked = next(r for r in records if r["type"] == "credential.revoked")
    assert revoked["selector"] == "hand-back" and revoked["reason"] == "done isolating"
    rejected = next(r for r in records if r["type"] == "scope_map.rejected")
    assert "no action classes" in rejected["problem"]


def test_no_token_or_key_material_in_the_log(flow: dict[str, object], bao: OpenBaoDev) -> None:
    cfg = flow["cfg"]
    raw = cfg.audit_path.read_text()  # type: ignore[attr-defined]
    key_pem, _ = pem_pair(flow["client"])  # type: ignore[arg-type]
    for secret in (flow["token"], bao.root_token, flow["jwt"],
                   key_pem.decode().splitlines()[1], "PRIVATE KEY", "hvs.", "s."):
        assert secret not in raw, secret


def test_verify_trace_and_export_from_the_cli(flow: dict[str, object],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = flow["cfg"]
    log = str(cfg.audit_path)  # type: ignore[attr-defined]
    pub = str(cfg.audit_key_path.with_suffix(".pub"))  # type: ignore[attr-defined]
    assert main(["audit", "verify", log, "--checkpoint", log + ".checkpoints",
                 "--public-key", pub]) == 0
    assert "intact" in capsys.readouterr().out
    cid = flow["ok"].credential.credential_id  # type: ignore[attr-defined]
    assert main(["audit", "trace", cid, "--log", log]) == 0
    text = capsys.readouterr().out
    for words in ("initiating event: splunk NOTABLE-1 — beaconing",
                  f"requesting workload: {CONTAINMENT}", "owner (answers for the policy): "
                  "incident-response", "escalation (should intervene): ir-oncall → "
                  "incident-commander", "no approval required by rule", f"credential {cid}",
                  "handed back by the workload", "done isolating"):
        assert words in text, text
    assert main(["audit", "trace", "req-flow-1", "--log", log, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["credentials"][0]["credential_id"] == cid
    assert main(["audit", "trace", "nope", "--log", log]) == 1
    capsys.readouterr()
    assert main(["audit", "export", "--format", "ocsf", "--log", log]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    classes = {(e["unmapped"]["type"], e["class_uid"], e["activity_id"]) for e in events}
    assert ("credential.minted", 3003, 1) in classes
    assert ("credential.revoked", 3005, 2) in classes
    deny = next(e for e in events if e["metadata"]["correlation_uid"] == "req-flow-2")
    assert deny["status_id"] == 2 and deny["actor"]["user"]["uid"] == TRIAGE
    assert main(["audit", "export", "--log", log, "--since", "2999-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("tamper", ["edit", "delete", "truncate"])
def test_cli_verify_names_the_first_bad_record(flow: dict[str, object], tmp_path: Path,
                                               tamper: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = flow["cfg"]
    src = cfg.audit_path  # type: ignore[attr-defined]
    lines = src.read_bytes().splitlines(keepends=True)
    if tamper == "edit":
        assert b"NOTABLE-1" in lines[2]
        lines[2] = lines[2].replace(b"NOTABLE-1", b"NOTABLE-2")
    elif tamper == "delete":
        del lines[3]
    else:
        lines = lines[:-2]
    copy = tmp_path / "audit.log"
    copy.write_bytes(b"".join(lines))
    (tmp_path / "audit.log.head").write_bytes(Path(str(src) + ".head").read_bytes())
    pub = str(cfg.audit_key_path.with_suffix(".pub"))  # type: ignore[attr-defined]
    rc = main(["audit", "verify", str(copy), "--checkpoint", str(src) + ".checkpoints",
               "--public-key", pub])
    err = capsys.readouterr().err
    assert rc == 1
    expected = {"edit": "record 3 does not match", "delete": "record 4 does not match",
                "truncate": "truncated"}[tamper]
    assert expected in err, err
    (tmp_path / "audit.log.head").unlink()  # deleting the newest signature does not help
    assert main(["audit", "verify", str(copy), "--public-key", pub]) == 1
    assert "is missing or empty" in capsys.readouterr().err


def test_a_read_only_audit_location_stops_the_broker_from_starting(
    bao: OpenBaoDev, identity: Identity, short_tmp: Path
) -> None:
    mnt = Path(tempfile.mkdtemp(prefix="ro-", dir=short_tmp))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        server = BrokerServer(broker_config(bao, identity, audit_path=mnt / "audit.log"))
        with pytest.raises(AuditError, match=r"cannot open the audit log .*Read-only"):
            server.start()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_audit_log_fails_issuance_and_leaves_no_live_credential(
    bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client, short_tmp: Path
) -> None:
    own = Path(tempfile.mkdtemp(prefix="full-", dir=short_tmp))
    audit = own / "audit.log"
    ready = own / "ready"
    # The file-size limit applies to every file of the process, the registry's SQLite WAL
    # too: give the log a history larger than the WAL will grow, so the limit bites on it.
    history = AuditLog(audit)
    for i in range(1200):
        history.append("history", note="x" * 1000, n=i)
    history.close()
    env = {**os.environ, "VAULT_TOKEN": bao.root_token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli.main", "serve", "--listen", "127.0.0.1:0",
         "--workload-api", identity.socket("broker"), "--scope-map", str(TEST_MAP),
         "--vault-addr", bao.addr, "--ready-file", str(ready), "--audit-log", str(audit),
         "--audit-key", str(own / "k.pem"), "--registry", str(own / "registry.db")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[bytes] = []
    threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(output)
            time.sleep(0.05)
        port = int(ready.read_text().strip().rsplit(":", 1)[1])
        s = stub(port, identity.ca, svid(identity.ca, CONTAINMENT))

        def ask() -> pb.IssueCredentialResponse:
            return s.IssueCredential(issue_request(
                "containment.isolate_host", target="ws-1", initiating_event=EVENT,
                justification="j" * 1500), timeout=15)

        def limit(size: int) -> None:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

        # Calibrate: how long are this request's decision and minted records?
        before = audit.stat().st_size
        ask()
        decision_len, minted_len = (len(x) for x in
                                    audit.read_bytes()[before:].splitlines(keepends=True))
        assert decision_len > 1500 > minted_len > 200

        # Full before anything is recorded: nothing is minted at all.
        alive = live_accessors(vault_root)
        limit(audit.stat().st_size)
        with pytest.raises(grpc.RpcError) as err:
            ask()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit log" in err.value.details() and "not writable" in err.value.details()
        assert live_accessors(vault_root) == alive

        # Room for the decision but not for the mint record: minted, then revoked at once.
        limit(audit.stat().st_size + decision_len + minted_len // 2)
        with pytest.raises(grpc.RpcError) as err:
            ask()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert live_accessors(vault_root) == alive  # nothing new is alive in Vault
        last = list(read_records(audit))[-1]
        assert last["type"] == "decision" and last["decision"]["outcome"] == "allow"

        # The log accepts writes again: the queued revocation is written first.
        limit(resource.RLIM_INFINITY)
        ask()
        tail = [r["type"] for r in read_records(audit)][-3:]
        assert tail == ["credential.revoked", "decision", "credential.minted"], tail
        assert proc.poll() is None  # SIGXFSZ did not kill the broker
    finally:
        proc.terminate()
        proc.wait(15)
    assert main(["audit", "verify", str(audit)]) == 0
