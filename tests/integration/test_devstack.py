"""`credbroker dev` and `credbroker demo` as a user runs them: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sidecar.client import SidecarClient

CLI = [sys.executable, "-m", "broker.cli.main"]


def _children_of(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_dev_stack_serves_writes_dev_json_and_stops_every_child() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="cbd-"))
    proc = subprocess.Popen([*CLI, "dev", "--run-dir", str(run_dir),
                             "--workload", "triage=spiffe://example.org/agent/triage",
                             "--workload", "responder=spiffe://example.org/agent/containment"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "dev.json").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "dev.json did not appear within 60 s"
            time.sleep(0.2)
        info = json.loads((run_dir / "dev.json").read_text())
        assert {"vault_addr", "vault_token", "broker_addr", "audit_path", "sidecars"} <= set(info)
        assert set(info["sidecars"]) == {"triage", "responder"}
        assert oct((run_dir / "dev.json").stat().st_mode & 0o777) == "0o600"
        resp = SidecarClient(info["sidecars"]["responder"]["socket"]).request_credential(
            "identity.disable_account", target="user-1",
            initiating_event={"source": "test", "id": "1"})
        assert resp["policies"] == ["credbroker-identity.disable_account"]
        children = _children_of(proc.pid)
        assert len(children) == 5  # OpenBao, broker, two sidecars, the web console
        assert info["console_url"].startswith("https://127.0.0.1:")
        log_text = "".join(p.read_text() for p in run_dir.glob("*.log"))
        assert resp["token"] not in log_text
        assert info["vault_token"] not in log_text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        stdout = proc.stdout.read() if proc.stdout else ""
        assert info["vault_token"] not in stdout
        assert "sidecar responder" in stdout
        time.sleep(0.5)
        assert not [c for c in children if _alive(c)], "children outlived the dev stack"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dev_refuses_bad_workload_flags() -> None:
    out = subprocess.run([*CLI, "dev", "--workload", "triage"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "must be NAME=SPIFFE_ID" in out.stderr
    out = subprocess.run([*CLI, "dev", "--workload", "x=spiffe://Example.org/a"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "lower-case" in out.stderr
    out = subprocess.run([*CLI, "dev", "--replicas", "0"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "--replicas 0: give 1 to 9 brokers" in out.stderr


@pytest.mark.slow
def test_demo_tells_the_story_and_exits_zero() -> None:
    env = {**os.environ}
    out = subprocess.run([*CLI, "demo"], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for words in ("granted", "Vault refused: permission denied", "denied (403",
                  "revoked in Vault", "all 12 steps behaved", "approved by: alice@example.org",
                  "409 frozen", "owner (answers for the policy): "
                  "incident-response", "intact"):
        assert words in out.stdout


@pytest.mark.slow
def test_vault_sync_against_the_dev_stack() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="cbs-"))
    proc = subprocess.Popen([*CLI, "dev", "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "dev.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        out = subprocess.run([*CLI, "vault", "sync", "--dev", str(run_dir), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["policies_written"] == [] and len(report["unchanged"]) == 3
        info = json.loads((run_dir / "dev.json").read_text())
        assert info["vault_token"] not in out.stdout + out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _wait_for_dev_json(proc: subprocess.Popen[str], run_dir: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not (run_dir / "dev.json").exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"dev.json did not appear within {timeout:.0f} s"
        time.sleep(0.2)
    info: dict = json.loads((run_dir / "dev.json").read_text())
    return info


def _act(*argv: str) -> subprocess.CompletedProcess[str]:
    """A responder's command, as dave (group responders), in its own process."""
    return subprocess.run([*CLI, *argv, "--yes", "--as", "dave@example.org"],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.slow
def test_dev_replicas_share_one_store_and_every_dev_command_reaches_them() -> None:
    """`credbroker dev --replicas 3`: three brokers on an embedded PostgreSQL, the sidecars
    spread across them; a revocation and a freeze through other replicas than the sidecar's
    take effect (OpenBao's word, the sidecar's answers); stop leaves no process behind."""
    import hvac
    import hvac.exceptions

    from broker.adapters.audit_pg import read_db_records
    from sidecar.client import SidecarError

    run_dir = Path(tempfile.mkdtemp(prefix="cbr-"))
    proc = subprocess.Popen([*CLI, "dev", "--replicas", "3", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = _wait_for_dev_json(proc, run_dir)
        brokers = info["brokers"]
        assert len(brokers) == len(set(brokers)) == 3
        assert info["broker_addr"] == brokers[0]  # every existing key is still there
        assert {"vault_addr", "vault_token", "audit_path", "sidecars", "registry_path"} <= set(info)
        assert info["store"].startswith("postgresql://")
        on = {name: sc["broker_addr"] for name, sc in info["sidecars"].items()}
        assert set(on.values()) <= set(brokers)
        assert len(set(on.values())) == len(on) == 2  # spread: one broker each
        assert on["triage"] == brokers[0]
        pg_pid = int((Path(info["postgres"]["data_dir"]) / "postmaster.pid")
                     .read_text().split()[0])
        assert _alive(pg_pid)
        children = _children_of(proc.pid)
        # OpenBao, PostgreSQL's guard, three brokers, two sidecars, the console
        assert len(children) == 8

        # Issued through the triage sidecar, on broker 1; revoked through broker 2.
        triage = SidecarClient(info["sidecars"]["triage"]["socket"])
        event = {"source": "test", "id": "R-1"}
        cred = triage.request_credential("enrichment", target="host-1", initiating_event=event)
        vault = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
        assert vault.auth.token.lookup(cred["token"])["data"]["ttl"] > 0
        out = _act("revoke", "--dev", str(run_dir), "--broker", brokers[1],
                   "--spiffe-id", "spiffe://example.org/agent/triage", "--reason", "leaked")
        assert out.returncode == 0, out.stderr
        with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
            vault.auth.token.lookup(cred["token"])
        assert info["audit_path"] == ""  # the audit log is in the store, one chain a broker
        revoked = [r for r in read_db_records(info["store"])
                   if r["type"] == "credentials.revoked"]
        assert revoked and revoked[-1]["by"] == "dave@example.org"
        assert cred["credential_id"] in revoked[-1]["credential_ids"]

        # A freeze through broker 3 reaches the triage sidecar, which watches broker 1.
        triage.request_credential("enrichment", target="host-2", initiating_event=event)
        again = triage.request_credential("enrichment", target="host-2", initiating_event=event)
        assert again["cached"] is True and triage.health()["cached_credentials"] == 1
        out = _act("freeze", "--dev", str(run_dir), "--broker", brokers[2],
                   "--action-class", "enrichment", "--reason", "bad TI feed")
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 20
        while triage.health()["cached_credentials"]:
            assert time.monotonic() < deadline, "the freeze never reached the triage sidecar"
            time.sleep(0.1)
        with pytest.raises(SidecarError) as refused:
            triage.request_credential("enrichment", target="host-2", initiating_event=event)
        assert refused.value.status == 409 and refused.value.code == "frozen"

        # The other --dev commands find the replicated stack through dev.json.
        sync = subprocess.run([*CLI, "vault", "sync", "--dev", str(run_dir), "--json"],
                              capture_output=True, text=True, timeout=60)
        assert sync.returncode == 0, sync.stderr
        assert json.loads(sync.stdout)["frozen"] == ["enrichment"]  # read from PostgreSQL
        verify = subprocess.run([*CLI, "audit", "verify", "--dev", str(run_dir)],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "3 chains" in verify.stdout or verify.stdout.count("chain") >= 3, verify.stdout
        listed = subprocess.run([*CLI, "credentials", "list", "--dev", str(run_dir),
                                 "--broker", brokers[2], "--json"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr

        log_text = "".join(p.read_text() for p in run_dir.glob("*.log"))
        assert cred["token"] not in log_text and info["vault_token"] not in log_text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert not [c for c in children if _alive(c)], "children outlived the dev stack"
        assert not _alive(pg_pid), "PostgreSQL outlived the dev stack"
        assert not (Path(info["postgres"]["data_dir"]) / "postmaster.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_replicated_dev_stack_killed_hard_leaves_no_postgresql() -> None:
    """SIGKILL gives the dev stack no chance to stop PostgreSQL (pg_ctl runs it in the
    background): its guard child, which dies with the stack, stops it."""
    run_dir = Path(tempfile.mkdtemp(prefix="cbk-"))
    proc = subprocess.Popen([*CLI, "dev", "--replicas", "1", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = _wait_for_dev_json(proc, run_dir)
        data = Path(info["postgres"]["data_dir"])
        pg_pid = int((data / "postmaster.pid").read_text().split()[0])
        assert _alive(pg_pid)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while _alive(pg_pid):
            assert time.monotonic() < deadline, "PostgreSQL outlived a dev stack killed hard"
            time.sleep(0.2)
        assert not (data / "postmaster.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_dev_stack_with_environments_serves_production_and_sandbox() -> None:
    """`credbroker dev --environments`: a second OpenBao as sandbox; a sandbox token is
    refused by production's OpenBao."""
    import hvac
    import hvac.exceptions

    run_dir = Path(tempfile.mkdtemp(prefix="cbe-"))
    proc = subprocess.Popen([*CLI, "dev", "--environments", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "dev.json").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "dev.json did not appear within 90 s"
            time.sleep(0.2)
        info = json.loads((run_dir / "dev.json").read_text())
        envs = info["environments"]
        assert envs["default"] == "production"
        assert envs["production"]["vault_addr"] == info["vault_addr"]
        containment = SidecarClient(info["sidecars"]["containment"]["socket"])
        event = {"source": "test", "id": "1"}
        cred = containment.request_credential("containment.isolate_host", target="ws-1",
                                              initiating_event=event, environment="sandbox")
        assert cred["environment"] == "sandbox"
        sandbox = envs["sandbox"]

        def read(addr: str) -> None:  # allowed but absent: 404; not allowed: 403
            hvac.Client(url=addr, token=cred["token"]).secrets.kv.v2.read_secret_version(
                path="soc/containment/edr/ws-1", raise_on_deleted_version=False)

        with pytest.raises(hvac.exceptions.InvalidPath):
            read(sandbox["vault_addr"])
        with pytest.raises(hvac.exceptions.Forbidden):
            read(info["vault_addr"])
        status, body = containment.raw("POST", "/v1/credentials", {
            "action_class": "identity.disable_account", "target": "u-1",
            "initiating_event": event, "environment": "sandbox"})
        assert status == 403 and body["error"]["code"] == "environment_not_allowed"
        log_text = "".join(p.read_text() for p in run_dir.glob("*.log"))
        assert sandbox["vault_token"] not in log_text and cred["token"] not in log_text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        stdout = proc.stdout.read() if proc.stdout else ""
        assert "environment sandbox" in stdout and sandbox["vault_token"] not in stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_openbao_on_a_port_taken_in_the_meantime_moves_to_another(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Between picking a free port and binding it another process may take it: the dev
    OpenBao starts on a new port, and is only "up" when it answers with its own root token
    (not whatever server holds the port)."""
    import socket

    import hvac

    from credbroker_dev import devstack

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = [port]
        real = devstack.free_port
        monkeypatch.setattr(devstack, "free_port", lambda: picks.pop() if picks else real())
        bao = devstack.OpenBaoDev(tmp_path)
        assert bao.port == port
        bao.start()
        try:
            assert bao.port != port and str(bao.port) in bao.addr
            assert hvac.Client(url=bao.addr, token=bao.root_token).is_authenticated()
        finally:
            bao.stop()
    fixed = devstack.OpenBaoDev(tmp_path, port=port)  # a port the caller chose is not moved
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(devstack.DevStackError, match="address already in use"):
            fixed.start(timeout=10)
    fixed.stop()
