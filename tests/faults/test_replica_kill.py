"""A replica SIGKILLed mid-issuance on a shared PostgreSQL store: another replica (which
takes over the leader lock the dead one's session held) finds its unfinished issuances,
revokes the tokens Vault minted for them and records and audits each, and clears the rest.

Two brokers run as real processes on one PostgreSQL database and one OpenBao; the first
reaches OpenBao through the fault proxy, which holds Vault's answers so that the kill lands
between "Vault minted" and "the broker recorded it". Checked from outside: OpenBao's token
list (root token), the store's rows (psycopg), and the audit log in the database.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import grpc
import psycopg
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit_pg import read_db_records
from broker.cli.main import main
from credbroker_dev.devpg import PgServer
from credbroker_dev.devstack import OpenBaoDev
from tests.faults.support import BrokerProcess, VaultView
from tests.integration.conftest import CONTAINMENT, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, TcpProxy, issue_request, stub, svid

IN_FLIGHT = 12


def _sql(url: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()  # type: ignore[arg-type]


def _request(i: int) -> pb.IssueCredentialRequest:
    if i % 2:
        return issue_request("containment.isolate_host", target=f"host-{i}",
                             initiating_event=EVENT, request_id=uuid.uuid4().hex)
    return issue_request(request_id=uuid.uuid4().hex)


def test_a_replica_killed_mid_issuance_is_cleaned_up_by_another(
        bao: OpenBaoDev, identity: Identity, proxy: TcpProxy, view: VaultView,
        postgres: PgServer) -> None:
    url = postgres.new_database()
    cfg_a = broker_config(bao, identity, vault_addr=proxy.addr, store_url=url)
    cfg_b = broker_config(bao, identity, store_url=url)
    a = BrokerProcess(cfg_a, vault_token=bao.root_token, log=cfg_a.audit_path.parent / "a.log")
    b = BrokerProcess(cfg_b, vault_token=bao.root_token, log=cfg_b.audit_path.parent / "b.log")
    port_a = a.start()
    b.start()
    (instance,) = _sql(url, "SELECT value FROM meta WHERE key='instance_id'")[0]
    try:
        leaders = lambda: [n for (n,) in _sql(  # noqa: E731
            url, "SELECT application_name FROM pg_stat_activity WHERE application_name "
                 "LIKE 'credbroker-leader-%%' AND pid IN (SELECT pid FROM pg_locks WHERE "
                 "locktype='advisory' AND granted)")]
        assert len(leaders()) == 1
        agents = {who: stub(port_a, identity.ca, svid(identity.ca, who))
                  for who in (TRIAGE, CONTAINMENT)}
        # Each identity's first mint of a class writes its token role: done before holding.
        agents[TRIAGE].IssueCredential(_request(0), timeout=15)
        agents[CONTAINMENT].IssueCredential(_request(1), timeout=15)

        def ours() -> set[str]:
            return {acc for acc, m in view.live_credbroker().items()
                    if m.get("broker_instance") == instance}

        before = ours()
        proxy.hold()
        outcomes: list[grpc.StatusCode] = []

        def call(i: int) -> None:
            who = CONTAINMENT if i % 2 else TRIAGE
            try:
                agents[who].IssueCredential(_request(i), timeout=60)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

        callers = [threading.Thread(target=call, args=(i,), daemon=True)
                   for i in range(IN_FLIGHT)]
        for t in callers:
            t.start()
        deadline = time.monotonic() + 15
        while len(ours() - before) < IN_FLIGHT * 3 // 4:
            assert time.monotonic() < deadline, "OpenBao never minted the held requests"
            time.sleep(0.05)
        a.kill()
        killed_at = time.monotonic()
        proxy.cut()
        proxy.release()
        for t in callers:
            t.join(30)
        assert len(outcomes) == IN_FLIGHT and grpc.StatusCode.OK not in outcomes
        orphans = ours() - before
        assert len(orphans) >= IN_FLIGHT * 3 // 4
        unresolved = _sql(url, "SELECT request_id FROM credentials WHERE state IN "
                               "('intent', 'ambiguous')")
        assert len(unresolved) >= len(orphans), "the dead replica's intents are not in the store"
        # b holds the leader lock now (a's session died with a, and the lock with it) ...
        deadline = time.monotonic() + 5
        while len(leaders()) != 1:
            assert time.monotonic() < deadline, "nobody took the leader lock over"
            time.sleep(0.1)
        # ... and its reconcile resolves every intent of a's once it is stale (30 s).
        deadline = time.monotonic() + 75
        while ours() - before or _sql(url, "SELECT 1 FROM credentials WHERE state IN "
                                           "('intent', 'ambiguous')"):
            assert time.monotonic() < deadline, \
                f"left: {len(ours() - before)} live orphan(s) in OpenBao"
            time.sleep(0.5)
        took = time.monotonic() - killed_at
        assert took < 45, took
        rows = dict(_sql(url, "SELECT credential_id, revoke_selector FROM credentials WHERE "
                              "credential_id = ANY(%s)", list(orphans)))
        assert rows == dict.fromkeys(orphans, "reconcile")
        revoked = {r["credential_id"] for r in read_db_records(url)
                   if r["type"] == "credential.revoked" and r.get("selector") == "reconcile"}
        assert orphans <= revoked, "the survivor did not audit each token it revoked"
        proxy.restore()
        # The survivor still issues.
        port_b = b.port
        assert stub(port_b, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            _request(100), timeout=15).credential.token
    finally:
        proxy.release()
        a.stop()
        b.stop()
        # The session's other fault tests hold every live credbroker token to a registry
        # file they track: these replicas' tokens (on PostgreSQL) end with the test.
        for acc, meta in view.live_credbroker().items():
            if meta.get("broker_instance") == instance:
                view.root.auth.token.revoke_accessor(acc)


def test_a_record_acknowledged_by_a_replica_survives_its_sigkill(
        bao: OpenBaoDev, identity: Identity, view: VaultView, postgres: PgServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.new_database()
    cfg_a = broker_config(bao, identity, store_url=url)
    cfg_b = broker_config(bao, identity, store_url=url)
    a = BrokerProcess(cfg_a, vault_token=bao.root_token, log=cfg_a.audit_path.parent / "a.log")
    b = BrokerProcess(cfg_b, vault_token=bao.root_token, log=cfg_b.audit_path.parent / "b.log")
    port_a = a.start()
    port_b = b.start()
    (instance,) = _sql(url, "SELECT value FROM meta WHERE key='instance_id'")[0]
    try:
        agent = stub(port_a, identity.ca, svid(identity.ca, TRIAGE))
        cred = agent.IssueCredential(_request(0), timeout=15).credential
        a.kill()  # acknowledged, then the pod (and its disk) is gone
        assert stub(port_b, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            _request(2), timeout=15).credential.token  # b writes on
        minted = [r for r in read_db_records(url) if r["type"] == "credential.minted"
                  and r["credential_id"] == cred.credential_id]
        assert len(minted) == 1
        chain_a = minted[0]["chain"]
        capsys.readouterr()
        assert main(["audit", "trace", cred.credential_id, "--store", url]) == 0
        out = capsys.readouterr().out
        assert f"credential {cred.credential_id} minted" in out and chain_a in out
        # a's chain ends signed: everything a acknowledged is covered by its signature.
        keys = [arg for c in (cfg_a, cfg_b)
                for arg in ("--public-key", str(c.audit_key_path.with_suffix(".pub")))]
        assert main(["audit", "verify", "--store", url, *keys]) == 0
        out = capsys.readouterr().out
        assert f"chain {chain_a}: intact" in out and "2 chain(s)" in out
        assert not cfg_a.audit_path.exists()  # nothing of the audit log was on a's disk
    finally:
        a.stop()
        b.stop()
        for acc, meta in view.live_credbroker().items():
            if meta.get("broker_instance") == instance:
                view.root.auth.token.revoke_accessor(acc)
