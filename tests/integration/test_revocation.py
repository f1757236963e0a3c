"""Revocation for responders against real OpenBao, real brokers and real sidecars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import hvac
import hvac.exceptions
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import read_records
from broker.adapters.registry import SqliteStore
from broker.cli.main import main
from broker.config import BrokerConfig
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    TEST_MAP,
    TRIAGE,
    Identity,
    broker_config,
    start_sidecar,
    vault_as,
)
from tests.integration.helpers import EVENT, TcpProxy, admin_stub, issue_request, stub, svid

Factory = Callable[..., BrokerServer]


@pytest.fixture
def make_broker(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client
                ) -> Iterator[Factory]:
    started: list[BrokerServer] = []

    def make(config: BrokerConfig | None = None, **overrides: object) -> BrokerServer:
        server = BrokerServer(config or broker_config(bao, identity, **overrides))
        server.start()
        started.append(server)
        return server

    yield make
    for s in started:
        if not s.stopped.is_set():
            s.stop(grace=0)


def mint(server: BrokerServer, identity: Identity, who: str, cls: str = "enrichment",
         target: str = "a") -> pb.Credential:
    resp = stub(server.port, identity.ca, svid(identity.ca, who)).IssueCredential(
        issue_request(cls, target=target, initiating_event=EVENT), timeout=10)
    return resp.credential


def alive(vault_root: hvac.Client, cred: pb.Credential) -> bool:
    return vault_root.auth.token.lookup_accessor(cred.credential_id) is not None \
        if _exists(vault_root, cred.credential_id) else False


def _exists(vault_root: hvac.Client, accessor: str) -> bool:
    try:
        vault_root.auth.token.lookup_accessor(accessor)
        return True
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return False


def works(bao: OpenBaoDev, cred: pb.Credential, path: str = "soc/enrichment/ti") -> bool:
    try:
        vault_as(bao, cred.token).secrets.kv.v2.read_secret_version(
            path=path, raise_on_deleted_version=False)
        return True
    except hvac.exceptions.Forbidden:
        return False


def cli(server: BrokerServer, identity: Identity, *argv: str, who: str = "admin") -> int:
    return main([*argv, "--broker", f"127.0.0.1:{server.port}",
                 "--workload-api", identity.socket(who)])


@pytest.mark.parametrize(("selector", "expect"), [
    (["--spiffe-id", TRIAGE], {"t1", "t2"}),
    (["--spiffe-id", "spiffe://example.org/agent/*", "--action-class",
      "containment.isolate_host"], {"c2"}),
    (["--target", "a"], {"t1", "c1"}),
    (["--target", "ws-*"], {"c2"}),
    (["--since", "MID"], {"c1", "c2"}),
    (["--until", "MID"], {"t1", "t2"}),
    (["--credential-id", "t2"], {"t2"}),
    (["--all"], {"t1", "t2", "c1", "c2"}),
])
def test_mass_revoke_kills_exactly_what_the_selector_matches(
    selector: list[str], expect: set[str], make_broker: Factory, identity: Identity,
    vault_root: hvac.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_broker()
    creds = {"t1": mint(server, identity, TRIAGE, target="a"),
             "t2": mint(server, identity, TRIAGE, target="b")}
    time.sleep(0.05)
    mid = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    creds |= {"c1": mint(server, identity, CONTAINMENT, target="a"),
              "c2": mint(server, identity, CONTAINMENT, "containment.isolate_host", "ws-1")}
    argv = [creds[a].credential_id if a in creds else (mid if a == "MID" else a)
            for a in selector]
    assert cli(server, identity, "revoke", *argv, "--reason", "test") == 0
    assert "preview only" in capsys.readouterr().out
    assert all(_exists(vault_root, c.credential_id) for c in creds.values())  # preview: nothing
    assert cli(server, identity, "revoke", *argv, "--reason", "incident 7", "--yes") == 0
    out = capsys.readouterr().out
    assert f"revoked {len(expect)}, already dead 0, pending 0, failed 0" in out
    for name, c in creds.items():
        assert _exists(vault_root, c.credential_id) == (name not in expect), name


def test_revoke_bad_input(make_broker: Factory, identity: Identity,
                          capsys: pytest.CaptureFixture[str]) -> None:
    server = make_broker()
    mint(server, identity, TRIAGE)
    assert cli(server, identity, "revoke", "--reason", "x", "--yes") == 2
    assert "--all" in capsys.readouterr().err
    assert cli(server, identity, "revoke", "--spiffe-id", "spiffe://example.org/a/../*",
               "--reason", "x", "--yes") == 2
    assert "'..' segment" in capsys.readouterr().err
    assert cli(server, identity, "revoke", "--spiffe-id", "spiffe://example.org/nobody",
               "--reason", "x", "--yes") == 2  # a typo is not "nothing to revoke"
    assert "matches no workload named in the scope map" in capsys.readouterr().err
    assert cli(server, identity, "revoke", "--spiffe-id", TRIAGE, "--target", "elsewhere",
               "--reason", "x", "--yes") == 0
    assert "no live credential matches" in capsys.readouterr().out
    assert cli(server, identity, "revoke", "--all", "--reason", "x", who="triage") == 4
    assert "not a credbroker administrator" in capsys.readouterr().err
    with pytest.raises(grpc.RpcError) as err:
        admin_stub(server.port, identity.ca, svid(identity.ca, CONTAINMENT)).ListFreezes(
            pb.ListFreezesRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_freeze_identity_refuses_its_tokens_before_returning(
    make_broker: Factory, identity: Identity, bao: OpenBaoDev, vault_root: hvac.Client,
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_broker()
    rogue = [mint(server, identity, CONTAINMENT, target=f"x{i}") for i in range(3)]
    bystander = mint(server, identity, TRIAGE)
    assert cli(server, identity, "freeze", "--spiffe-id", CONTAINMENT, "--reason",
               "rogue agent", "--yes") == 0
    assert "3 live credential(s) refused by Vault" in capsys.readouterr().out
    # Refused by Vault already when the command returned (the entity is disabled):
    assert not any(works(bao, c) for c in rogue)
    assert works(bao, bystander)
    with pytest.raises(grpc.RpcError) as err:
        mint(server, identity, CONTAINMENT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rogue agent" in err.value.details() and ADMIN in err.value.details()
    sc = start_sidecar(identity, "containment", f"127.0.0.1:{server.port}",
                       short_tmp / "sc-frozen.sock")
    try:
        status, body = sc.client.raw("POST", "/v1/credentials", {"action_class": "enrichment"})
        assert status == 409 and body["error"]["code"] == "frozen"  # type: ignore[index]
        assert "rogue agent" in body["error"]["message"]  # type: ignore[index]
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
    deadline = time.monotonic() + 10
    while any(_exists(vault_root, c.credential_id) for c in rogue):  # revoked in background
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert cli(server, identity, "unfreeze", "--spiffe-id", CONTAINMENT, "--reason",
               "contained", "--yes") == 0
    assert works(bao, mint(server, identity, CONTAINMENT))
    records = list(read_records(server.config.audit_path))
    freeze = next(r for r in records if r["type"] == "freeze")
    assert freeze["by"] == f"automation:{ADMIN}" and freeze["reason"] == "rogue agent"
    assert freeze["actor"] == {"kind": "automation", "client": ADMIN}
    # who and why are on record before Vault is asked; what Vault did follows
    enforced = next(r for r in records if r["type"] == "freeze.enforced")
    assert enforced["freeze_id"] == freeze["freeze_id"] and enforced["seq"] > freeze["seq"]
    assert enforced["credentials_matched"] == 3
    assert len(enforced["vault_entities_disabled"]) == 1
    unfreeze = next(r for r in records if r["type"] == "unfreeze")
    assert unfreeze["reason"] == "contained"
    bulk = next(r for r in records if r["type"] == "credentials.revoked")
    assert sorted(bulk["credential_ids"]) == sorted(c.credential_id for c in rogue)


def test_freeze_class_refuses_that_class_only(make_broker: Factory, identity: Identity,
                                              bao: OpenBaoDev, vault_root: hvac.Client) -> None:
    server = make_broker()
    enrich = [mint(server, identity, TRIAGE, target="p"), mint(server, identity, CONTAINMENT)]
    isolate = mint(server, identity, CONTAINMENT, "containment.isolate_host", "ws-2")
    resp = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN)).Freeze(
        pb.FreezeRequest(action_class="enrichment", reason="bad TI feed"), timeout=30)
    assert resp.vault_policy_frozen and resp.credentials_matched == 2
    assert not any(works(bao, c) for c in enrich)
    assert works(bao, isolate, "soc/containment/edr")
    with pytest.raises(grpc.RpcError) as err:
        mint(server, identity, TRIAGE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A scope-map sync (e.g. a reload) must not thaw a frozen class's policy.
    assert server.scope_maps is not None and server.responder is not None
    assert server._vault is not None
    server._vault.sync_scope_map(server.scope_maps.current, server.responder.frozen_classes())
    assert "FROZEN" in vault_root.sys.read_policy("credbroker-enrichment")["data"]["rules"]
    admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN)).Unfreeze(
        pb.UnfreezeRequest(action_class="enrichment", reason="feed fixed"), timeout=30)
    assert works(bao, mint(server, identity, TRIAGE))


def test_sidecar_cache_is_purged_within_a_second(make_broker: Factory, identity: Identity,
                                                 short_tmp: Path) -> None:
    server = make_broker()
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{server.port}", short_tmp / "sc-p.sock")
    try:
        assert sc.service.synced.wait(5)
        a = sc.client.request_credential("enrichment", target="one")
        b = sc.client.request_credential("enrichment", target="two")
        assert len(sc.service.cache) == 2
        t0 = time.monotonic()
        admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN)).ListCredentials(
            pb.Selector(all=True), timeout=10)
        list(admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN)).RevokeCredentials(
            pb.RevokeCredentialsRequest(selector=pb.Selector(credential_ids=[a["credential_id"]]),
                                        reason="test"), timeout=30))
        while sc.service.cache.holds(a["credential_id"]):
            assert time.monotonic() - t0 < 1.0, "cache not purged within 1 s"
            time.sleep(0.02)
        assert sc.service.cache.holds(b["credential_id"])
        admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN)).Freeze(
            pb.FreezeRequest(action_class="enrichment", reason="x"), timeout=30)
        t0 = time.monotonic()
        while len(sc.service.cache):
            assert time.monotonic() - t0 < 1.0, "cache not purged within 1 s of a freeze"
            time.sleep(0.02)
        assert b["credential_id"]
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def test_frozen_state_and_pending_revocations_survive_a_restart(
    bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client, make_broker: Factory
) -> None:
    proxy = TcpProxy(bao.port)
    cfg = broker_config(bao, identity, vault_addr=proxy.addr)
    server = make_broker(cfg)
    victim = mint(server, identity, TRIAGE)
    admin = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN))
    admin.Freeze(pb.FreezeRequest(action_class="containment.isolate_host", reason="drill"),
                 timeout=30)
    proxy.cut()  # Vault unreachable from the broker
    progress = list(admin.RevokeCredentials(pb.RevokeCredentialsRequest(
        selector=pb.Selector(credential_ids=[victim.credential_id]), reason="partition"),
        timeout=60))
    assert progress[-1].summary.pending == 1
    listed = admin.ListCredentials(pb.Selector(all=True), timeout=10).credentials
    assert [c.state for c in listed if c.credential_id == victim.credential_id] == []
    server.stop(grace=0)
    assert _exists(vault_root, victim.credential_id)  # Vault never heard of the revocation
    proxy.restore()
    again = make_broker(cfg)  # same registry and audit log
    assert not _exists(vault_root, victim.credential_id)  # retried at start-up
    with pytest.raises(grpc.RpcError) as err:
        mint(again, identity, CONTAINMENT, "containment.isolate_host", "h")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "drill" in err.value.details()


def test_sigkill_between_mint_and_record_leaves_no_live_token(
    bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client, short_tmp: Path,
    make_broker: Factory
) -> None:
    proxy = TcpProxy(bao.port)
    cfg = broker_config(bao, identity, vault_addr=proxy.addr)
    ready = cfg.audit_path.parent / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli.main", "serve", "--listen", "127.0.0.1:0",
         "--workload-api", cfg.workload_api_socket, "--scope-map", str(TEST_MAP),
         "--vault-addr", proxy.addr, "--ready-file", str(ready), "--audit-log",
         str(cfg.audit_path), "--audit-key", str(cfg.audit_key_path), "--registry",
         str(cfg.registry_path)],
        env={**os.environ, "VAULT_TOKEN": bao.root_token},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        port = int(ready.read_text().strip().rsplit(":", 1)[1])
        instance = SqliteStore(cfg.registry_path).instance_id
        before = set(vault_root.list("auth/token/accessors")["data"]["keys"])
        proxy.hold()  # Vault mints, but the broker does not hear back
        caller = threading.Thread(target=lambda: _ignore(lambda: stub(
            port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request(), timeout=30)), daemon=True)
        caller.start()
        new: set[str] = set()
        while not new:
            assert time.monotonic() < deadline + 30, "Vault never minted"
            new = set(vault_root.list("auth/token/accessors")["data"]["keys"]) - before
            time.sleep(0.02)
        (accessor,) = new
        assert vault_root.auth.token.lookup_accessor(accessor)["data"]["meta"][
            "broker_instance"] == instance
        proc.send_signal(signal.SIGKILL)  # between mint and record
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.release()
    assert _exists(vault_root, accessor)  # live and nobody knows about it...
    make_broker(cfg)  # ...until the broker starts again on the same registry
    assert not _exists(vault_root, accessor)
    assert SqliteStore(cfg.registry_path).intents() == []


def _ignore(fn: Callable[[], object]) -> None:
    try:
        fn()
    except grpc.RpcError:
        pass


def test_one_workload_cannot_take_every_stream(make_broker: Factory, identity: Identity) -> None:
    server = make_broker()
    s = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
    calls = [s.WatchRevocations(pb.WatchRevocationsRequest(), timeout=30) for _ in range(4)]
    for c in calls:
        assert next(c).HasField("sync")
    with pytest.raises(grpc.RpcError) as err:
        next(s.WatchRevocations(pb.WatchRevocationsRequest(), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for c in calls:
        c.cancel()
