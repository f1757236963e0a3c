"""Audit log: durable append throughput (group commit) and verification throughput.

    .venv/bin/python bench/bench_audit.py [--seconds 3] [--verify-records 200000]
        [--postgres] [--store postgresql://…]

Appends are real decision-sized records, each durable (written and fsynced)
before append() returns; concurrent appenders share fsyncs. Verification reads
the file and checks the whole hash chain.

``--postgres`` adds the audit log in PostgreSQL (``broker.adapters.audit_pg``: one transaction
per batch, signed head in it) beside the signed file rows: on ``--store URL`` (a fresh
database), else on a throw-away server from the PostgreSQL binaries with fsync on, each
as a ratio to the file at the same concurrency.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.adapters.audit import AuditLog
from broker.core.auditchain import verify_chain

RECORD = {
    "request_id": "0" * 32, "spiffe_id": "spiffe://example.org/ns/soc/sa/containment-agent",
    "request": {"action_class": "containment.isolate_host", "target": "ws-0231",
                "initiating_event": {"source": "splunk", "id": "NOTABLE-4242",
                                     "summary": "beaconing to a known C2 domain"},
                "justification": "isolate ws-0231: confirmed beaconing", "ttl_seconds": 0},
    "decision": {"outcome": "allow", "rule": "containment.isolate_host.workloads[0]",
                 "reasons": ["matches"], "scope_map_version": "sha256:" + "a" * 64,
                 "owner": {"team": "incident-response", "contact": "ir-lead@example.org"},
                 "escalation": ["ir-oncall", "incident-commander"]},
    "proof": {"x509_serial": "ab" * 20, "jwt_id": "cd" * 16},
}


def appends(path: Path, threads: int, seconds: float, *, signed: bool = False) -> float:
    # signed: as the broker runs, an Ed25519 signature over the new head with every
    # durable batch (LOG.head, one more fsync per batch)
    log = AuditLog(path, signing_key=Ed25519PrivateKey.generate() if signed else None)
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            log.append("decision", **RECORD)
            counts[i] += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    log.close()
    return sum(counts) / elapsed


def pg_appends(url: str, threads: int, seconds: float) -> float:
    """Appends per second to a new chain of the audit log in PostgreSQL, signed batches."""
    from broker.adapters.audit_pg import PostgresAuditLog
    from broker.adapters.registry import open_store
    from broker.adapters.store_pg import PostgresStore

    store = open_store(url=url, pool_size=4)
    assert isinstance(store, PostgresStore)
    log = PostgresAuditLog(store, origin=f"bench/{threads}-{time.monotonic_ns()}",
                           signing_key=Ed25519PrivateKey.generate())
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            log.append("decision", **RECORD)
            counts[i] += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    store.close()
    return sum(counts) / elapsed


def _postgres(url: str) -> tuple[str, object]:
    """(URL of a fresh database, the server to destroy after, or None)."""
    if url:
        return url, None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from credbroker_dev.devpg import PgServer

    pg = PgServer()
    pg.init()
    with (pg.data / "postgresql.conf").open("a") as f:
        f.write("fsync = on\nsynchronous_commit = on\n")  # durable, as in production
    pg.start()
    return pg.new_database(), pg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--verify-records", type=int, default=200_000)
    ap.add_argument("--postgres", action="store_true", help="also the audit log in PostgreSQL")
    ap.add_argument("--store", default="", help="PostgreSQL database for --postgres "
                    "(default: a throw-away server)")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="cb-audit-bench-", dir=os.getcwd()))
    rows = []
    pg_url, pg = _postgres(args.store) if args.postgres else ("", None)
    try:
        for signed in (False, True):
            for threads in (1, 16, 64):
                rate = appends(d / f"append-{threads}-{signed}.log", threads, args.seconds,
                               signed=signed)
                what = "signed batch" if signed else "chain only"
                rows.append((f"durable append ({what}), {threads} concurrent appender(s)",
                             f"{rate:,.0f}"))
                if signed and pg_url:
                    pg_rate = pg_appends(pg_url, threads, args.seconds)
                    rows.append((f"durable append in PostgreSQL (signed batch), {threads} "
                                 f"concurrent appender(s) [{pg_rate / rate:.2f}x the file]",
                                 f"{pg_rate:,.0f}"))
    finally:
        if pg is not None:
            pg.destroy()  # type: ignore[attr-defined]
    big = d / "verify.log"
    log = AuditLog(big)
    t0 = time.perf_counter()
    # build fast: many appenders so fsyncs are shared
    per = args.verify_records // 32

    def fill() -> None:
        for _ in range(per):
            log.append("decision", **RECORD)

    ts = [threading.Thread(target=fill) for _ in range(32)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log.close()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with big.open("rb") as f:
        verdict = verify_chain(f)
    verify_s = time.perf_counter() - t0
    assert verdict.ok
    rows.append((f"verify ({verdict.records:,} records, {big.stat().st_size / 1e6:.0f} MB)",
                 f"{verdict.records / verify_s:,.0f}"))
    print(f"# audit log, {datetime.now(UTC):%Y-%m-%d}, {platform.machine()} {os.cpu_count()} "
          f"cores, Python {platform.python_version()}, files under {d} (built the verify log "
          f"in {build_s:.1f} s)")
    print("| operation | records/s |")
    print("|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate} |")
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


if __name__ == "__main__":
    main()
