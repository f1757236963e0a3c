"""Soak: issuance from many agents while the broker's link to OpenBao misbehaves at random.

    PYTHONPATH=. .venv/bin/python bench/soak.py [--minutes 2] [--agents 16] [--seed N]

One real OpenBao dev server, one broker (in this process) whose only way to OpenBao
is the fault proxy of the test suite, and ``--agents`` threads asking for credentials
(and handing some back) over gRPC mTLS. A fault thread injects, at random: a cut
(partition), 502s for mints after OpenBao minted, held answers (released before or
after the broker's 5 s timeout), a black hole, and a slow link. Then the faults stop,
the reconcile loop gets its chance plus one full scan (what it does every 60 s), and
the invariant is checked from outside, against OpenBao's own list of tokens:

* live credbroker tokens untracked: live in OpenBao but not in the registry or not
  named in the audit log (must be 0);
* lost audit records: credentials handed to agents that the audit log does not record
  as minted (must be 0);
* handed out, not in the registry (must be 0);
* handed out, then revoked by the reconcile scan as an orphan (must be 0);
* orphans revoked and audited more than once (must be 0).

Not part of ``make test``; exits 1 when any of these is not 0.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

import grpc
import hvac

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.config import BrokerConfig
from broker.grpc.server import BrokerServer
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi
from credbroker_dev.devstack import OpenBaoDev
from tests.faults.support import (
    BrokerFiles,
    VaultView,
    audit_records,
    registry_rows,
    verdict,
)
from tests.integration.helpers import EVENT, TcpProxy, stub, svid

TEST_MAP = Path(__file__).resolve().parents[1] / "tests" / "data" / "test-scope-map.yaml"
TRIAGE = "spiffe://example.org/agent/triage"
CONTAINMENT = "spiffe://example.org/agent/containment"
BROKER = "spiffe://example.org/credbroker/broker"
MINT = b"/auth/token/create/"


class Soak:
    def __init__(self, proxy: TcpProxy, port: int, ca: DevCA, seed: int) -> None:
        self.proxy = proxy
        self.seed = seed
        rng = random.Random(seed)  # noqa: S311 - a reproducible fault schedule, not crypto
        self.port = port
        self.ca = ca
        self.rng = rng
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.handed: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.handed_back: Counter[str] = Counter()

    def agent(self, n: int) -> None:
        who = CONTAINMENT if n % 2 else TRIAGE
        s = stub(self.port, self.ca, svid(self.ca, who, ttl=timedelta(hours=2)))
        rng = random.Random(self.seed * 1000 + n)  # noqa: S311 - fault schedule, not crypto
        while not self.stop.is_set():
            destructive = who == CONTAINMENT and rng.random() < 0.5
            req = pb.IssueCredentialRequest(
                action_class="containment.isolate_host" if destructive else "enrichment",
                target=f"host-{rng.randrange(1000)}", request_id=uuid.uuid4().hex,
                initiating_event=EVENT if destructive else None, ttl_seconds=60)
            try:
                cred = s.IssueCredential(req, timeout=30).credential
            except grpc.RpcError as exc:
                code = dict(exc.trailing_metadata() or ()).get(  # type: ignore[attr-defined]
                    "credbroker-error-code", "")
                with self.lock:
                    self.outcomes[f"{exc.code().name} {code}".strip()] += 1
                time.sleep(0.05)
                continue
            with self.lock:
                self.handed.append(cred.credential_id)
                self.outcomes["OK"] += 1
            if rng.random() < 0.1:  # some agents hand theirs back early
                try:
                    s.RevokeCredential(pb.RevokeCredentialRequest(
                        credential_id=cred.credential_id, reason="soak"), timeout=30)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                with self.lock:
                    self.handed_back[outcome] += 1

    def inject(self) -> None:
        p, rng = self.proxy, self.rng
        while not self.stop.wait(rng.uniform(0.5, 3.0)):
            fault = rng.choice(["cut", "502", "hold", "hold-past-timeout", "blackhole", "slow"])
            with self.lock:
                self.faults[fault] += 1
            if fault == "cut":
                p.cut()
                self.stop.wait(rng.uniform(0.2, 3.0))
                p.restore()
            elif fault == "502":
                p.fail_answers(MINT if rng.random() < 0.7 else b"")
                self.stop.wait(rng.uniform(0.2, 2.0))
                p.stop_failing()
            elif fault == "hold":
                p.hold()
                self.stop.wait(rng.uniform(0.1, 2.0))
                if rng.random() < 0.5:
                    p.cut()  # the held answers die with their connections
                    p.release()
                    p.restore()
                p.release()
            elif fault == "hold-past-timeout":
                p.hold()
                self.stop.wait(rng.uniform(5.5, 7.0))
                p.release()
            elif fault == "blackhole":
                p.blackhole()
                self.stop.wait(rng.uniform(1.0, 6.0))
                p.unblackhole()
            else:
                p.slow(rng.uniform(0.02, 0.4))
                self.stop.wait(rng.uniform(1.0, 4.0))
                p.slow(0)

    def heal(self) -> None:
        p = self.proxy
        p.release()
        p.unstall()
        p.stop_failing()
        p.unblackhole()
        p.slow(0)
        p.restore()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)  # noqa: S311
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    bao = OpenBaoDev(work)
    bao.start()
    ca = DevCA("example.org", now=datetime.now(UTC))
    api = DevWorkloadApi(ca, svid_ttl=timedelta(hours=2))
    api.add_workload(BROKER, str(work / "broker.sock"), dns_names=(DEFAULT_BROKER_DNS,))
    api.start()
    proxy = TcpProxy(bao.port)
    cfg = BrokerConfig(listen="127.0.0.1:0", workload_api_socket=f"unix:{work / 'broker.sock'}",
                       scope_map_path=TEST_MAP, vault_addr=proxy.addr,
                       vault_token=bao.root_token, audit_path=work / "audit.log",
                       registry_path=work / "registry.db", audit_key_path=work / "audit.key",
                       health_interval=1.0)
    server = BrokerServer(cfg)
    server.start()
    assert server.store is not None and server.responder is not None
    soak = Soak(proxy, server.port, ca, seed)
    print(f"soak: {args.minutes:g} min, {args.agents} agents, seed {seed}, work dir {work}",
          flush=True)
    try:
        agents = [threading.Thread(target=soak.agent, args=(i,), daemon=True)
                  for i in range(args.agents)]
        injector = threading.Thread(target=soak.inject, daemon=True)
        started = time.monotonic()
        for t in [*agents, injector]:
            t.start()
        soak.stop.wait(args.minutes * 60)
        soak.stop.set()
        injector.join(15)
        soak.heal()
        for t in agents:
            t.join(60)
        issuing = time.monotonic() - started
        # The reconcile loop runs every 2 s; give it a few rounds, then the full scan it
        # makes every 60 s (a mint delivered to Vault after its intent was resolved).
        time.sleep(6)
        report = server.responder.reconcile(full=True)
        server.responder.retry_pending()
        view = VaultView(hvac.Client(url=bao.addr, token=bao.root_token))
        with soak.lock:
            handed = list(soak.handed)
        v = verdict(view, [BrokerFiles(registry=cfg.registry_path, audit=cfg.audit_path)],
                    handed)
        records = audit_records(cfg.audit_path)
        by_reconcile = Counter(str(r.get("credential_id")) for r in records
                               if r["type"] == "credential.revoked"
                               and r.get("selector") == "reconcile")
        reconciled = set(by_reconcile)
        twice = sum(1 for n in by_reconcile.values() if n > 1)
        handed_then_reconciled = set(handed) & reconciled
        rows = registry_rows(cfg.registry_path)
        states = Counter(("revoke_pending" if r["revoke_pending"] else str(r["state"]))
                         for r in rows)
        print(f"issuing for {issuing:.0f} s; faults injected: {dict(sorted(soak.faults.items()))}")
        print(f"issuance outcomes: {dict(soak.outcomes.most_common())}")
        print(f"hand-backs: {dict(soak.handed_back)}")
        print(f"registry rows by state: {dict(states)}")
        print(f"tokens revoked by the reconcile loop/scans (never handed out): "
              f"{len(reconciled)}; final full scan: revoked {report.revoked}, "
              f"cleared {report.cleared}, pending {report.pending}"
              + (f", error {report.error}" if report.error else ""))
        print(f"live credbroker tokens in OpenBao: {v.live}")
        print(f"live credbroker tokens untracked: {len(v.untracked)}")
        for accessor, why in sorted(v.untracked.items()):
            print(f"  {accessor}: {why}")
        print(f"lost audit records (handed out, no credential.minted): {len(v.not_audited)}")
        print(f"handed out, not in the registry: {len(v.not_registered)}")
        print(f"handed out, then revoked by reconcile as an orphan: "
              f"{len(handed_then_reconciled)}")
        print(f"orphans revoked and audited more than once: {twice}")
        bad = len(v.untracked) + len(v.not_audited) + len(v.not_registered) \
            + len(handed_then_reconciled) + twice
        print("INVARIANT " + ("HOLDS" if bad == 0 else "VIOLATED"))
        return 0 if bad == 0 else 1
    finally:
        soak.heal()
        server.stop(grace=1)
        api.stop()
        bao.stop()


if __name__ == "__main__":
    sys.exit(main())
