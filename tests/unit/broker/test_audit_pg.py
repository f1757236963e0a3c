"""The audit log in PostgreSQL (``broker.adapters.audit_pg``), on a real server (the session
fixture).

What the database holds is read with SQL and ``credbroker audit verify --store``, not
through the writer; tampering is done with SQL, as someone with database access would.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.adapters.audit import read_checkpoints
from broker.adapters.audit_pg import PostgresAuditLog, read_db_records, verify_db
from broker.adapters.registry import SCHEMA_VERSION, open_store
from broker.adapters.store_pg import AUDIT_SCHEMA, PostgresStore
from broker.cli.main import main
from broker.errors import AuditError
from credbroker_dev.devpg import PgServer


def _sql(url: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _store(url: str) -> PostgresStore:
    store = open_store(url=url, pool_size=4)
    assert isinstance(store, PostgresStore)
    return store


def _key(tmp_path: Path, name: str = "a") -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM,
                                                  PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def _verify(url: str, *args: str) -> int:
    return main(["audit", "verify", "--store", url, *args])


def test_concurrent_appends_commit_together_as_one_signed_chain(
        postgres: PgServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.new_database()
    store = _store(url)
    key, pub = _key(tmp_path)
    log = PostgresAuditLog(store, origin="pod-a/1", signing_key=key,
                           mirror_path=tmp_path / "mirror")
    (commits_before,) = _sql(url, "SELECT xact_commit FROM pg_stat_database WHERE "
                                  "datname = current_database()")[0]
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(50):
            s = log.append("decision", request_id=f"{k}-{i}").seq
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (commits_after,) = _sql(url, "SELECT xact_commit FROM pg_stat_database WHERE "
                                 "datname = current_database()")[0]
    # seq 1 is the chain's opening record
    assert sorted(seqs) == list(range(2, 402))
    assert log.size == 401
    # group commit: far fewer transactions than records (pg_stat counts every commit)
    assert commits_after - commits_before < 400
    rows = _sql(url, "SELECT seq, hash, record FROM audit_records WHERE origin='pod-a/1' "
                     "ORDER BY seq")
    assert [r[0] for r in rows] == list(range(1, 402))
    assert json.loads(rows[0][2])["type"] == "audit.chain_opened"
    size, head, signed = _sql(url, "SELECT size, head, signed_head FROM audit_chains")[0]
    assert (size, head) == (401, rows[-1][1]) and json.loads(signed)["size"] == 401
    cp = log.checkpoint()
    assert cp is not None and cp.size == 401
    assert read_checkpoints(tmp_path / "mirror") == [cp]
    assert _sql(url, "SELECT size FROM audit_checkpoints") == [(401,)]
    assert _verify(url, "--public-key", str(pub), "--checkpoint",
                   str(tmp_path / "mirror")) == 0
    out = capsys.readouterr().out
    assert "chain pod-a/1: intact, 401 records; consistent with 3 signed checkpoint(s)" in out
    store.close()


def test_every_chain_is_verified_and_tampering_names_the_record(
        postgres: PgServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.new_database()
    store = _store(url)
    (ka, pa), (kb, pb) = _key(tmp_path, "a"), _key(tmp_path, "b")
    a = PostgresAuditLog(store, origin="pod-a/1", signing_key=ka)
    b = PostgresAuditLog(store, origin="pod-b/2", signing_key=kb)

    def burst(log: PostgresAuditLog, name: str) -> None:
        for i in range(30):
            log.append("decision", request_id=f"{name}-{i}")

    threads = [threading.Thread(target=burst, args=(log, n)) for log, n in ((a, "a"), (b, "b"))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = ["--public-key", str(pa), "--public-key", str(pb)]
    assert _verify(url, *keys) == 0
    assert "intact, 2 chain(s), 182 records" in capsys.readouterr().out
    # b's opening record saw a's chain
    first_b = json.loads(_sql(url, "SELECT record FROM audit_records WHERE origin='pod-b/2' "
                                   "AND seq=1")[0][0])
    assert first_b["chains"] == {"pod-a/1": {"size": 1, "head": _sql(
        url, "SELECT hash FROM audit_records WHERE origin='pod-a/1' AND seq=1")[0][0]}}
    # Only a's key: b's chain is signed by a key not given.
    assert _verify(url, "--public-key", str(pa)) == 1
    assert "chain pod-b/2: NOT INTACT" in capsys.readouterr().err

    # One field of one row changed.
    _sql(url, "UPDATE audit_records SET record = replace(record, '\"a-7\"', '\"a-x\"') "
              "WHERE origin='pod-a/1' AND record LIKE '%%\"a-7\"%%'")
    (seq,) = _sql(url, "SELECT seq FROM audit_records WHERE record LIKE '%%\"a-x\"%%'")[0]
    assert _verify(url, *keys) == 1
    err = capsys.readouterr().err
    assert f"chain pod-a/1: NOT INTACT: record {seq} does not match the chain" in err
    v = verify_db(url, [])
    assert not v.ok and v.chains[0].verdict.bad_record == seq

    # A middle row deleted (from b).
    _sql(url, "DELETE FROM audit_records WHERE origin='pod-b/2' AND seq=40")
    assert _verify(url, *keys) == 1
    err = capsys.readouterr().err
    assert "chain pod-b/2: NOT INTACT: record 40 is missing (the next one stored is record " \
           "41): it was deleted" in err

    # A whole chain deleted, rows, head row and checkpoints: b's opening record saw it.
    _sql(url, "DELETE FROM audit_records WHERE origin='pod-a/1'")
    _sql(url, "DELETE FROM audit_chains WHERE origin='pod-a/1'")
    assert _verify(url, "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"] == [
        "chain pod-a/1 is missing: chain pod-b/2 saw it with 1 record(s) when it opened; it "
        "was deleted from the database"]
    store.close()


def test_a_chain_rewritten_with_recomputed_hashes_fails_its_signature(
        postgres: PgServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from broker.core.auditchain import GENESIS, chain_hash

    url = postgres.new_database()
    store = _store(url)
    key, pub = _key(tmp_path)
    log = PostgresAuditLog(store, origin="pod-a/1", signing_key=key)
    for i in range(5):
        log.append("credential.minted", credential_id=f"c{i}")
    assert _verify(url, "--public-key", str(pub)) == 0
    rows = _sql(url, "SELECT seq, record FROM audit_records ORDER BY seq")
    head = GENESIS
    for seq, body in rows:  # someone edits record 3 and recomputes every hash after it
        body = body.replace('"c2"', '"c9"')
        head = chain_hash(head, body.encode())
        _sql(url, "UPDATE audit_records SET record=%s, hash=%s WHERE origin='pod-a/1' AND "
                  "seq=%s", body, head.hex(), seq)
    _sql(url, "UPDATE audit_chains SET head=%s", head.hex())
    assert _verify(url) == 0  # the chain alone is consistent again ...
    capsys.readouterr()
    assert _verify(url, "--public-key", str(pub)) == 1  # ... its signature is not
    assert "the chain was rewritten" in capsys.readouterr().err
    store.close()


def test_appends_fail_closed_while_postgres_is_down_and_recover(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    own = PgServer()
    own.start()
    try:
        url = own.new_database()
        store = open_store(url=url, pool_size=2)
        assert isinstance(store, PostgresStore)
        key, pub = _key(tmp_path)
        errors: list[int] = []
        log = PostgresAuditLog(store, origin="pod-a/1", signing_key=key,
                               on_error=errors.append)
        log.append("decision", request_id="before")
        own.stop()
        with pytest.raises(AuditError, match="is not writable"):
            log.append("decision", request_id="while-down")
        with pytest.raises(AuditError, match="is not writable"):
            log.check_writable()
        assert log.append_or_queue("credential.revoked", credential_id="c1") is None
        assert errors and log.size == 2
        own.start()
        deadline = time.monotonic() + 60
        while True:  # the pool reaches PostgreSQL again (its retries back off): no restart
            try:
                log.check_writable()
                break
            except AuditError:
                assert time.monotonic() < deadline, "still not writable after PostgreSQL returned"
                time.sleep(0.2)
        log.append("decision", request_id="after")
        records = [(r["type"], r.get("request_id") or r.get("credential_id"))
                   for r in read_db_records(url)]
        # the refused record is not there; the queued revocation was written first
        assert records == [("audit.chain_opened", None), ("decision", "before"),
                           ("credential.revoked", "c1"), ("decision", "after")]
        assert _verify(url, "--public-key", str(pub)) == 0
        text = capsys.readouterr()
        assert "postgres@" not in text.err
        store.close()
    finally:
        own.destroy()


def test_the_schema_is_upgraded_from_version_5_keeping_everything(postgres: PgServer) -> None:
    url = postgres.new_database()
    store = _store(url)
    store.record_intent(request_id="r1", spiffe_id="spiffe://example.org/a", action_class="c",
                        target="", event_source="", event_id="", at=_now())
    store.close()
    # Back to version 5, as a broker before this one left it.
    for table in ("audit_checkpoints", "audit_records", "audit_chains"):
        _sql(url, f"DROP TABLE {table}")
    _sql(url, "ALTER TABLE credentials DROP COLUMN environment")  # version 7
    _sql(url, "DELETE FROM schema_version WHERE version >= 6")
    with pytest.raises(Exception, match="credbroker store migrate"):
        open_store(url=url, migrate=False)
    store = _store(url)
    assert store.migrated == (5, SCHEMA_VERSION) and SCHEMA_VERSION == 7
    assert store.get("r1") is None and [r.request_id for r in store.intents()] == ["r1"]
    log = PostgresAuditLog(store, origin="pod-a/1")
    log.append("decision", request_id="r1")
    assert [r["type"] for r in read_db_records(url)] == ["audit.chain_opened", "decision"]
    assert AUDIT_SCHEMA.count("CREATE TABLE") == 3
    store.close()


def test_a_store_without_the_audit_tables_says_what_to_do(
        postgres: PgServer, capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.new_database()
    assert main(["audit", "trace", "x", "--store", url]) != 0
    assert "credbroker store migrate" in capsys.readouterr().err
    assert main(["audit", "verify", "--store", "mysql://x/y"]) != 0
    assert "postgresql://" in capsys.readouterr().err


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_the_console_reads_and_verifies_every_replicas_chain_in_the_store(
        postgres: PgServer, tmp_path: Path) -> None:
    """The web console of replicated brokers (``--audit-store``): its search and trace see
    both replicas' records, its badge verifies both chains and turns red on a row edited
    with SQL."""
    from broker.console.app import ConsoleConfig
    from broker.console.pages import _audit_search, verify_store_now

    url = postgres.new_database()
    store = _store(url)
    key, pub = _key(tmp_path)
    a = PostgresAuditLog(store, origin="pod-a/1", signing_key=key)
    b = PostgresAuditLog(store, origin="pod-b/1", signing_key=key)
    a.append("decision", request_id="r-1", spiffe_id="spiffe://example.org/agent/triage")
    a.append("credential.minted", request_id="r-1", credential_id="acc-1")
    b.append("credential.revoked", credential_id="acc-1", by="dave@example.org")
    cfg = ConsoleConfig(tls_cert=tmp_path / "c", tls_key=tmp_path / "k", broker_addr="x:1",
                        workload_api="unix:/x", oidc_issuer="https://idp", audit_store=url,
                        audit_public_key=pub)
    verdict = verify_store_now(url, pub)
    assert verdict["ok"] and verdict["records"] == 5, verdict  # 2 chain openings + 3
    lines, _hits = _audit_search(cfg, "acc-1")
    assert lines is not None
    text = "\n".join(lines)
    assert "acc-1" in text and "dave@example.org" in text  # minted on A, revoked on B
    _sql(url, "UPDATE audit_records SET record = replace(record, 'dave', 'mallory') "
              "WHERE origin = %s AND strpos(record, 'dave') > 0", "pod-b/1")
    broken = verify_store_now(url, pub)
    assert not broken["ok"] and "pod-b/1" in broken["problem"]
    a.close()
    b.close()
    store.close()
