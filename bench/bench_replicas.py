"""Replicas: 3 brokers on one PostgreSQL store vs 1 broker on SQLite, against one OpenBao.

Starts a real OpenBao (dev), a dev Workload API for the brokers' SVID, a PostgreSQL
server from the server binaries (:mod:`credbroker_dev.devpg`) and the brokers as separate
processes (``python -m broker.cli.main serve``); this process is the load generator. Two
set-ups run one after the other against the same OpenBao:

* **1 broker, SQLite**: one broker, ``--registry`` (today's default);
* **3 brokers, PostgreSQL**: three brokers, ``--store postgresql://…`` on one database.

For each it measures

1. issuance: ``--agents`` agents (32; distinct dev SVIDs ``spiffe://example.org/fleet/aN``,
   one mTLS connection each, spread round-robin over the brokers) issue ``--n`` credentials
   in all (IssueCredential, a new target each time: every one a real Vault mint), as fast
   as they can: p50/p99 latency and throughput;
2. propagation: a revocation made through the first broker, timed until a sidecar's
   ``WatchRevocations`` stream held on the last broker receives it (``--propagation``
   rounds; with one broker, the same one) — the issue's "within 1 s" across replicas;
3. bulk revocation: ``--revoke-n`` credentials of another class minted the same way (spread
   over the brokers), then one ``RevokeCredentials`` by class through the first broker,
   timed from the call until its summary arrives; afterwards a sample of the tokens is
   looked up in OpenBao (not timed), which must say every one is dead.

    .venv/bin/python bench/bench_replicas.py [--n 2000] [--agents 32] [--revoke-n 10000]

On a machine with few cores the three brokers, PostgreSQL, OpenBao and the load generator
share them: the ratio then says what replication costs there, not what it buys.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import hvac
import hvac.exceptions
from bench_scale import OPTIONS, Creds, pct  # same dev SVIDs and channel options

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.adapters.audit import load_or_create_signing_key
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devpg import PgServer
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi
from credbroker_dev.devstack import OpenBaoDev

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "spiffe://example.org/credbroker/admin"
BROKER = "spiffe://example.org/credbroker/broker"

SCOPE_MAP = """\
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  enrichment:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/fleet/*]
    credential:
      ttl: 5m
      max_ttl: 10m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
  bulk:
    risk: low
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/fleet/*]
    credential:
      ttl: 30m
      max_ttl: 60m
      vault_policy:
        - path: secret/data/soc/bulk/*
          capabilities: [read]
"""


class Brokers:
    """``count`` broker processes on one store (``store_args``), all with the same SVID."""

    def __init__(self, run: Path, bao: OpenBaoDev, wl_socket: str, count: int,
                 store_args: list[str]) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addrs: list[str] = []
        (run / "scope-map.yaml").write_text(SCOPE_MAP)
        key = run / "audit.key"
        load_or_create_signing_key(key, create=True)
        env = {**os.environ, "VAULT_TOKEN": bao.root_token}
        readies = []
        for k in range(count):
            ready = run / f"broker-{k}.addr"
            log = (run / f"broker-{k}.log").open("wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "broker.cli.main", "serve", "--listen", "127.0.0.1:0",
                 "--workload-api", "unix:" + wl_socket,
                 "--scope-map", str(run / "scope-map.yaml"), "--vault-addr", bao.addr,
                 "--ready-file", str(ready), "--audit-log", str(run / f"audit-{k}.log"),
                 "--audit-key", str(key), *store_args, "--admin-id", ADMIN,
                 "--automation-id", ADMIN],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
            readies.append(ready)
        deadline = time.monotonic() + 90
        for k, ready in enumerate(readies):
            while not ready.exists():
                if self.procs[k].poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"broker {k} did not start; see {run}/broker-{k}.log")
                time.sleep(0.1)
            self.addrs.append(ready.read_text().strip())

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_agents(addrs: list[str], creds: Creds, agents: int, total: int, action_class: str,
               tag: str) -> tuple[list[float], float, list[str]]:
    """``agents`` threads (one SVID and connection each, agent i on broker i mod len) issue
    ``total`` credentials in all. Latencies (ms), wall seconds, the tokens."""
    per = [total // agents + (1 if i < total % agents else 0) for i in range(agents)]
    stubs = []
    channels = []
    for i in range(agents):
        ch = grpc.secure_channel(addrs[i % len(addrs)],
                                 creds.for_id(f"spiffe://example.org/fleet/a{i}"),
                                 options=OPTIONS)
        channels.append(ch)
        stubs.append(pb_grpc.CredentialBrokerStub(ch))
    ev = pb.InitiatingEvent(source="bench", id="REPLICAS-1")
    latencies: list[float] = []
    tokens: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def issue(i: int, target: str) -> str:
        resp = stubs[i].IssueCredential(pb.IssueCredentialRequest(
            action_class=action_class, target=target, initiating_event=ev), timeout=60)
        return str(resp.credential.token)

    for i in range(agents):  # warm up the connection and the identity (not in `tokens`)
        stubs[i].IssueCredential(pb.IssueCredentialRequest(
            action_class="enrichment", target=f"{tag}-warm-{i}", initiating_event=ev),
            timeout=60)
    go = threading.Barrier(agents + 1)

    def agent(i: int) -> None:
        mine: list[float] = []
        got: list[str] = []
        go.wait()
        try:
            for j in range(per[i]):
                t = time.perf_counter()
                got.append(issue(i, f"{tag}-{i}-{j}"))
                mine.append((time.perf_counter() - t) * 1000)
        except BaseException as exc:  # reported below: a bench must not hide a failure
            errors.append(exc)
        with lock:
            latencies.extend(mine)
            tokens.extend(got)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for t in threads:
        t.start()
    go.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for ch in channels:
        ch.close()
    if errors:
        raise SystemExit(f"{len(errors)} agent(s) failed; first: {errors[0]!r}")
    return latencies, wall, tokens


def bulk_revoke(addr: str, creds: Creds, action_class: str) -> tuple[float, pb.RevokeSummary]:
    """One RevokeCredentials by class through ``addr``: seconds until its summary."""
    ch = grpc.secure_channel(addr, creds.for_id(ADMIN), options=OPTIONS)
    stub = pb_grpc.CredentialAdminStub(ch)
    started = time.perf_counter()
    summary = None
    for progress in stub.RevokeCredentials(pb.RevokeCredentialsRequest(
            selector=pb.Selector(action_class=action_class), reason="bench: bulk revocation"),
            timeout=1800):
        if progress.HasField("summary"):
            summary = progress.summary
    took = time.perf_counter() - started
    ch.close()
    if summary is None:
        raise SystemExit("RevokeCredentials ended without a summary")
    return took, summary


def propagation(addrs: list[str], creds: Creds, rounds: int) -> list[float]:
    """A revocation through the first broker, seen on a sidecar's stream held on the last
    one (the same broker when there is one): milliseconds from the call to the event, for
    ``rounds`` credentials issued one at a time through the stream's broker."""
    me = "spiffe://example.org/fleet/watcher"
    on = grpc.secure_channel(addrs[-1], creds.for_id(me), options=OPTIONS)
    via = grpc.secure_channel(addrs[0], creds.for_id(ADMIN), options=OPTIONS)
    broker, admin = pb_grpc.CredentialBrokerStub(on), pb_grpc.CredentialAdminStub(via)
    ev = pb.InitiatingEvent(source="bench", id="PROPAGATION-1")
    stream = broker.WatchRevocations(pb.WatchRevocationsRequest(), timeout=600)
    next(stream)  # the sync event: the stream is up
    out: list[float] = []
    try:
        for k in range(rounds):
            cred = broker.IssueCredential(pb.IssueCredentialRequest(
                action_class="enrichment", target=f"prop-{k}", initiating_event=ev),
                timeout=60).credential
            started = time.perf_counter()
            for _ in admin.RevokeCredentials(pb.RevokeCredentialsRequest(
                    selector=pb.Selector(credential_ids=[cred.credential_id]),
                    reason="bench: propagation"), timeout=60):
                pass
            for event in stream:
                if event.HasField("revoked") and \
                        cred.credential_id in event.revoked.credential_ids:
                    break
            out.append((time.perf_counter() - started) * 1000)
    finally:
        stream.cancel()
        on.close()
        via.close()
    return out


def dead_in_vault(vault: hvac.Client, tokens: list[str], sample: int) -> int:
    """How many of a random sample of ``tokens`` OpenBao says are dead."""
    dead = 0
    for token in random.sample(tokens, min(sample, len(tokens))):
        try:
            vault.auth.token.lookup(token)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
            dead += 1
    return dead


def measure(name: str, brokers: Brokers, creds: Creds, vault: hvac.Client,
            args: argparse.Namespace, note: Callable[[str], None]) -> dict[str, float]:
    lat, wall, _ = run_agents(brokers.addrs, creds, args.agents, args.n, "enrichment", name)
    note(f"{name}: issued {len(lat)} in {wall:.1f} s")
    seen = propagation(brokers.addrs, creds, args.propagation)
    note(f"{name}: a revocation through the first broker reached a stream on the last in "
         f"p50 {statistics.median(seen):.0f} ms, p99 {pct(seen, 0.99):.0f} ms "
         f"({len(seen)} rounds)")
    _, mint_wall, tokens = run_agents(brokers.addrs, creds, args.agents, args.revoke_n,
                                      "bulk", name + "-bulk")
    note(f"{name}: minted {len(tokens)} for the bulk revocation in {mint_wall:.1f} s")
    took, summary = bulk_revoke(brokers.addrs[0], creds, "bulk")
    sample = min(args.verify, len(tokens))
    dead = dead_in_vault(vault, tokens, sample)
    note(f"{name}: revoked {summary.revoked} (already dead {summary.already_dead}, pending "
         f"{summary.pending}, failed {summary.failed}) in {took:.1f} s; OpenBao: {dead}/"
         f"{sample} sampled tokens dead")
    if dead != sample or summary.failed or summary.pending:
        raise SystemExit(f"{name}: the bulk revocation did not kill every credential")
    return {"p50": statistics.median(lat), "p99": pct(lat, 0.99), "rps": len(lat) / wall,
            "prop_p50": statistics.median(seen), "prop_p99": pct(seen, 0.99),
            "revoke_s": took, "revoked": float(summary.revoked + summary.already_dead)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="issuances per set-up, in all")
    ap.add_argument("--agents", type=int, default=32, help="concurrent agents")
    ap.add_argument("--revoke-n", type=int, default=10000,
                    help="credentials revoked in one bulk revocation")
    ap.add_argument("--propagation", type=int, default=50,
                    help="revocations timed from the call to the event on another replica's "
                         "stream")
    ap.add_argument("--verify", type=int, default=300,
                    help="tokens looked up in OpenBao after each bulk revocation")
    args = ap.parse_args()
    print(f"bench_replicas {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; "
          f"Python {platform.python_version()}; {args.agents} agents, {args.n} issuances, "
          f"bulk revocation of {args.revoke_n}", flush=True)

    def note(text: str) -> None:
        print("  " + text, flush=True)

    run_dir = Path(tempfile.mkdtemp(prefix="cbrep-"))
    bao = OpenBaoDev(run_dir)
    bao.start()
    pg = PgServer()
    api = None
    results: dict[str, dict[str, float]] = {}
    try:
        pg.start()
        ca = DevCA("example.org", now=datetime.now(UTC))
        api = DevWorkloadApi(ca, svid_ttl=timedelta(hours=2))
        wl_socket = str(run_dir / "wl-broker.sock")
        api.add_workload(BROKER, wl_socket, dns_names=(DEFAULT_BROKER_DNS,))
        api.start()
        creds = Creds(ca)
        vault = hvac.Client(url=bao.addr, token=bao.root_token)
        setups = [("1 broker, SQLite", 1, ["--registry", str(run_dir / "sqlite" / "registry.db")],
                   run_dir / "sqlite"),
                  ("3 brokers, PostgreSQL", 3, ["--store", pg.new_database()], run_dir / "pg")]
        for name, count, store, where in setups:
            where.mkdir()
            brokers = Brokers(where, bao, wl_socket, count, store)
            try:
                results[name] = measure(name, brokers, creds, vault, args, note)
            finally:
                brokers.stop()
    finally:
        if api is not None:
            api.stop()
        bao.stop()
        pg.destroy()

    one, three = results["1 broker, SQLite"], results["3 brokers, PostgreSQL"]
    print(f"\n| set-up ({args.agents} agents) | issuance p50 ms | p99 ms | issuances/s | "
          f"bulk revocation of {args.revoke_n} s | revoked/s | revocation to a stream "
          "p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rps']:.0f} | "
              f"{r['revoke_s']:.1f} | {r['revoked'] / r['revoke_s']:.0f} | "
              f"{r['prop_p50']:.0f} / {r['prop_p99']:.0f} |")
    print(f"| ratio 3 on PostgreSQL / 1 on SQLite | {three['p50'] / one['p50']:.2f}x | "
          f"{three['p99'] / one['p99']:.2f}x | {three['rps'] / one['rps']:.2f}x | "
          f"{three['revoke_s'] / one['revoke_s']:.2f}x | | "
          f"{three['prop_p99'] / one['prop_p99']:.2f}x (p99) |")


if __name__ == "__main__":
    main()
