"""The responder's CLI against a real broker, OpenBao and Workload API, run as a person would.

A typo must not look like "all clear", a time must not crash it, the broker is found from
the environment, `credentials list` says what is live, and the audit trail tells how each
credential ended.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import hvac
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.cli.main import main
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    TEST_MAP,
    TRIAGE,
    Identity,
    broker_config,
)
from tests.integration.helpers import admin_stub, svid
from tests.integration.test_revocation import _exists, cli, mint

ROOT = Path(__file__).parents[2]
ISOLATE = "containment.isolate_host"


@pytest.fixture
def server(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client
           ) -> Iterator[BrokerServer]:
    s = BrokerServer(broker_config(bao, identity))
    s.start()
    yield s
    s.stop(grace=0)


def run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m broker.cli.main ARGV`` in a subprocess (a traceback would show), with ``env``."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CREDBROKER_BROKER", "CREDBROKER_BROKER_ADDR", "SPIFFE_ENDPOINT_SOCKET")}
    return subprocess.run([sys.executable, "-m", "broker.cli.main", *argv], cwd=ROOT,
                          env=clean | env, capture_output=True, text=True, timeout=120)


def where(server: BrokerServer, identity: Identity) -> dict[str, str]:
    return {"CREDBROKER_BROKER": f"127.0.0.1:{server.port}",
            "SPIFFE_ENDPOINT_SOCKET": identity.socket("admin")}


def test_credentials_list_says_what_is_live(server: BrokerServer, identity: Identity,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    t = mint(server, identity, TRIAGE, target="host-a")
    c = mint(server, identity, CONTAINMENT, ISOLATE, "ws-1")
    assert cli(server, identity, "credentials", "list", "--spiffe-id", TRIAGE, "--json") == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["credential_id"] == t.credential_id and item["spiffe_id"] == TRIAGE
    assert item["action_class"] == "enrichment" and item["target"] == "host-a"
    assert item["initiating_event"] == {"source": "splunk", "id": "NOTABLE-1"}
    assert item["state"] == "live" and item["request_id"]
    assert item["issued_at"].endswith("Z") and item["expires_at"] > item["issued_at"]
    assert cli(server, identity, "credentials", "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["credential", "identity", "action", "class",
                                           "target", "initiating", "event", "issued",
                                           "expires", "state"]
    assert t.credential_id in out and c.credential_id in out and "splunk:NOTABLE-1" in out
    assert "2 live credential(s)" in out
    for argv, expect in ((["--action-class", ISOLATE], {c.credential_id}),
                         (["--target", "ws-*"], {c.credential_id}),
                         (["--since", "10m"], {t.credential_id, c.credential_id}),
                         (["--until", "1h"], set())):
        assert cli(server, identity, "credentials", "list", *argv, "--json") == 0, argv
        assert {x["credential_id"] for x in json.loads(capsys.readouterr().out)} == expect
    # Read-only: nothing was revoked by listing.
    assert cli(server, identity, "credentials", "list", "--until", "1h") == 0
    assert "no live credential matches" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["revoke", "--action-class", "enrichmnt", "--reason", "x", "--yes"],
    ["revoke", "--action-class", "enrichmnt"],
    ["credentials", "list", "--action-class", "enrichmnt"],
    ["freeze", "--action-class", "enrichmnt"],
    ["freeze", "--action-class", "enrichmnt", "--reason", "x", "--yes"],
])
def test_an_unknown_action_class_is_exit_2_naming_the_known_ones(
        argv: list[str], server: BrokerServer, identity: Identity, vault_root: hvac.Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    cred = mint(server, identity, TRIAGE)
    assert cli(server, identity, *argv) == 2
    err = capsys.readouterr().err
    assert "action class 'enrichmnt' is not in the scope map; known: " in err
    assert "enrichment" in err and ISOLATE in err and "Traceback" not in err
    assert _exists(vault_root, cred.credential_id)
    assert not server.responder.freezes  # type: ignore[union-attr]


@pytest.mark.parametrize("argv", [
    ["revoke", "--spiffe-id", "spiffe://example.org/agent/triag", "--reason", "x", "--yes"],
    ["revoke", "--spiffe-id", "spiffe://example.org/nobody/*"],
    ["credentials", "list", "--spiffe-id", "spiffe://other.org/agent/triage"],
    ["freeze", "--spiffe-id", "spiffe://example.org/agent/triag", "--reason", "x", "--yes"],
])
def test_an_identity_pattern_matching_no_workload_is_exit_2_naming_them(
        argv: list[str], server: BrokerServer, identity: Identity, vault_root: hvac.Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    cred = mint(server, identity, TRIAGE)
    assert cli(server, identity, *argv) == 2
    err = capsys.readouterr().err
    assert "matches no workload named in the scope map" in err
    assert TRIAGE in err and CONTAINMENT in err
    assert _exists(vault_root, cred.credential_id)
    assert not server.responder.freezes  # type: ignore[union-attr]


def test_the_admin_api_refuses_unknown_names_itself(server: BrokerServer,
                                                    identity: Identity) -> None:
    admin = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN))
    for call in (lambda: admin.ListCredentials(pb.Selector(action_class="nope"), timeout=10),
                 lambda: list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
                     selector=pb.Selector(spiffe_id="spiffe://example.org/x"), reason="r"),
                     timeout=10)),
                 lambda: admin.Freeze(pb.FreezeRequest(action_class="nope", reason="r"),
                                      timeout=10)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_class_gone_from_the_map_ends_its_credentials_and_selectors_name_what_exists(
        bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client, short_tmp: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    scope = short_tmp / "renamed-map.yaml"
    shutil.copy(TEST_MAP, scope)
    s = BrokerServer(broker_config(bao, identity, scope_map_path=scope, reload_interval=0))
    s.start()
    try:
        cred = mint(s, identity, TRIAGE)
        scope.write_text(TEST_MAP.read_text().replace("  enrichment:", "  enrichment.v2:", 1))
        assert s.reload()
        deadline = time.monotonic() + 10
        while _exists(vault_root, cred.credential_id):  # ended with its class
            assert time.monotonic() < deadline, "the removed class's credential lives on"
            time.sleep(0.1)
        assert cli(s, identity, "credentials", "list", "--action-class", "enrichment") == 2
        assert cli(s, identity, "revoke", "--action-class", "enrichmnt") == 2
        assert "known: containment.isolate_host, enrichment.v2" in capsys.readouterr().err
    finally:
        scope.write_text(TEST_MAP.read_text())
        s.reload()  # the shared OpenBao gets the enrichment policy back
        s.stop(grace=0)


def test_revoke_since_a_duration_from_the_environment_as_typed(
        server: BrokerServer, identity: Identity, vault_root: hvac.Client) -> None:
    old = mint(server, identity, TRIAGE, target="old")
    env = where(server, identity)
    r = run("revoke", "--since", "10m", **env)  # a preview needs no --reason
    assert r.returncode == 0, r.stderr
    assert "1 live credential(s) would be revoked" in r.stdout and "preview only" in r.stdout
    r = run("revoke", "--since", "10m", "--yes", **env)
    assert r.returncode == 2 and "--reason is required with --yes" in r.stderr
    assert _exists(vault_root, old.credential_id)
    r = run("revoke", "--since", "2026-01-01T00:00:00", "--reason", "x", "--yes", **env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not a time; write a duration back from now" in r.stderr
    r = run("revoke", "--since", "10m", "--reason", "incident 11", "--yes", "--json", **env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["revoked"] == 1
    assert not _exists(vault_root, old.credential_id)


def test_flags_win_over_the_environment(server: BrokerServer, identity: Identity) -> None:
    mint(server, identity, CONTAINMENT)
    wrong = {"CREDBROKER_BROKER": "127.0.0.1:1", "SPIFFE_ENDPOINT_SOCKET": "unix:/nonexistent"}
    r = run("credentials", "list", "--broker", f"127.0.0.1:{server.port}", "--workload-api",
            identity.socket("admin"), **wrong)
    assert r.returncode == 0 and CONTAINMENT in r.stdout, r.stderr
    r = run("freeze", "--list", **where(server, identity))
    assert r.returncode == 0 and "nothing is frozen" in r.stdout, r.stderr
    r = run("freeze", "--list", "--workload-api", identity.socket("admin"))
    assert r.returncode == 2 and "$CREDBROKER_BROKER" in r.stderr


def test_trace_and_export_tell_how_credentials_ended(
        server: BrokerServer, identity: Identity, capsys: pytest.CaptureFixture[str]) -> None:
    revoked = mint(server, identity, TRIAGE, target="r")
    frozen = mint(server, identity, CONTAINMENT, ISOLATE, "ws-7")
    assert cli(server, identity, "revoke", "--spiffe-id", TRIAGE, "--reason", "incident 9",
               "--yes") == 0
    assert cli(server, identity, "freeze", "--action-class", ISOLATE, "--reason",
               "bad playbook", "--yes") == 0
    assert server.responder is not None and server.responder.last_freeze_revocation is not None
    server.responder.last_freeze_revocation.join(30)
    assert cli(server, identity, "unfreeze", "--action-class", ISOLATE, "--reason", "fixed",
               "--yes") == 0
    capsys.readouterr()
    log = str(server.config.audit_path)

    assert main(["audit", "trace", revoked.credential_id, "--log", log]) == 0
    text = capsys.readouterr().out
    assert f"revoked in a bulk revocation by automation:{ADMIN}" in text and "incident 9" in text
    assert f"selector spiffe_id={TRIAGE}" in text and "still live" not in text
    assert main(["audit", "trace", revoked.credential_id, "--log", log, "--json"]) == 0
    (end,) = json.loads(capsys.readouterr().out)["ended"]
    assert (end["how"], end["by"], end["reason"], end["type"]) == (
        "revoked", f"automation:{ADMIN}", "incident 9", "credentials.revoked")

    assert main(["audit", "trace", frozen.credential_id, "--log", log]) == 0
    text = capsys.readouterr().out
    assert f"frozen by automation:{ADMIN}" in text and f"of action class {ISOLATE}" in text
    assert "bad playbook" in text and "selector freeze " in text and "still live" not in text
    assert main(["audit", "trace", frozen.credential_id, "--log", log, "--json"]) == 0
    ended = json.loads(capsys.readouterr().out)["ended"]
    assert [e["how"] for e in ended] == ["frozen", "revoked"]
    assert ended[0]["freeze_id"] == ended[1]["freeze_id"]

    assert main(["audit", "export", "--format", "ocsf", "--log", log]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    mapped = {(e["unmapped"]["type"], e["class_uid"], e["activity_id"]) for e in events}
    assert {("credentials.revoked", 3005, 2), ("freeze", 3005, 2),
            ("unfreeze", 3005, 1)} <= mapped
    assert not any(e["class_uid"] == 6002 and e["activity_id"] == 99 for e in events)
