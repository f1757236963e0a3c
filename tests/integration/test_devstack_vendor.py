"""`credbroker dev --federated-vendor` as a user runs it: a second trust domain, its agent's
sidecar verifying the broker with our bundle, and the broker federating the vendor."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hvac
import pytest

from broker.adapters.audit import read_records
from sidecar.client import SidecarClient

CLI = [sys.executable, "-m", "broker.cli.main"]


@pytest.mark.slow
def test_dev_federated_vendor_serves_the_vendor_agent_through_its_sidecar() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="cbv-"))
    proc = subprocess.Popen([*CLI, "dev", "--run-dir", str(run_dir), "--federated-vendor"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "dev.json").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "dev.json did not appear within 90 s"
            time.sleep(0.2)
        info = json.loads((run_dir / "dev.json").read_text())
        vendor = info["sidecars"]["vendor-triage"]
        assert vendor["spiffe_id"] == "spiffe://vendor.example/agent/triage"
        assert info["federated_vendor"]["trust_domain"] == "vendor.example"
        got = SidecarClient(vendor["socket"]).request_credential("vendor.enrichment")
        # OpenBao knows the token; the decision names the foreign trust domain.
        root = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
        assert root.auth.token.lookup(got["token"])["data"]["ttl"] > 0
        decision = next(r for r in read_records(Path(info["audit_path"]))
                        if r["type"] == "decision" and r.get("request_id") == got["request_id"])
        assert decision["federated_from"] == "vendor.example"
        # Our own agents still work beside it.
        ours = SidecarClient(info["sidecars"]["triage"]["socket"]).request_credential(
            "enrichment")
        assert ours["token"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "vendor.enrichment" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
