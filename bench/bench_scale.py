"""One broker, N connected sidecars: issuance latency and revocation fan-out while they are held.

Starts a real OpenBao (dev), a dev Workload API for the broker's own SVID, and the broker
as a separate process (``python -m broker.cli.main serve``). This one load-generator process
then, on one asyncio loop:

1. measures an agent's issuance (IssueCredential over mTLS, new target each time) with
   nothing else connected: the *idle* p50/p99;
2. opens N ``WatchRevocations`` streams, each on its own mTLS connection with a distinct
   dev X.509-SVID (``spiffe://example.org/fleet/s<i>``), and measures the same issuance
   while they are held: the *loaded* p50/p99;
3. freezes a class (``credbroker freeze --action-class``) R times and measures when each
   of the N streams hears of it (fan-out latency from the moment the Freeze call is sent);
4. closes the streams, and with N pending approval waits (``AwaitApproval``, one per
   identity ``spiffe://example.org/fleet/w<i>``) measures the issuance again.

    .venv/bin/python bench/bench_scale.py [--n 2000] [--samples 300] [--rounds 5]

Target (issue #12): loaded issuance p99 <= 2x idle p99, fan-out p99 <= 1 s at N = 2000.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.adapters.audit import load_or_create_signing_key
from broker.core.spiffeid import SpiffeId
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi, IssuedX509
from credbroker_dev.devstack import OpenBaoDev

ROOT = Path(__file__).resolve().parent.parent
AGENT = "spiffe://example.org/agent/triage"
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
    workloads: [spiffe://example.org/agent/triage, spiffe://example.org/fleet/*]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
  fleet.gated:
    risk: high
    owner: {team: soc-platform, contact: soc-platform@example.org}
    escalation: [soc-oncall]
    workloads: [spiffe://example.org/fleet/*]
    credential:
      ttl: 2m
      max_ttl: 5m
      vault_policy:
        - path: secret/data/soc/enrichment/*
          capabilities: [read]
    approval: {mode: jit, approvers: [ir-leads], escalate_after: 5m, expires: 10m}
"""


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: list[float]) -> str:
    return (f"p50 {statistics.median(samples):7.2f} ms  p99 {pct(samples, 0.99):7.2f} ms  "
            f"max {max(samples):7.2f} ms  (n={len(samples)})")


class Creds:
    """mTLS channel credentials for dev SVIDs of one CA."""

    def __init__(self, ca: DevCA) -> None:
        self.ca = ca
        self.now = datetime.now(UTC)

    def for_id(self, spiffe_id: str) -> grpc.ChannelCredentials:
        s: IssuedX509 = self.ca.issue_x509(SpiffeId.parse(spiffe_id), now=self.now,
                                           ttl=timedelta(hours=2))
        key = serialization.load_der_private_key(s.key_der, None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        cert = x509.load_der_x509_certificate(s.cert_der).public_bytes(serialization.Encoding.PEM)
        return grpc.ssl_channel_credentials(root_certificates=self.ca.bundle_pem,
                                            private_key=key, certificate_chain=cert)


OPTIONS = [("grpc.ssl_target_name_override", DEFAULT_BROKER_DNS),
           # one connection per channel, as N separate sidecars would have
           ("grpc.use_local_subchannel_pool", 1)]


def aio_channel(addr: str, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(addr, creds, options=OPTIONS)


def issuance_samples(addr: str, creds: grpc.ChannelCredentials, n: int, tag: str
                     ) -> list[float]:
    """``n`` sequential issuances by one agent (its own thread, sync client), in ms."""
    ch = grpc.secure_channel(addr, creds, options=OPTIONS)
    stub = pb_grpc.CredentialBrokerStub(ch)
    ev = pb.InitiatingEvent(source="bench", id="SCALE-1")

    def one(i: int) -> None:
        stub.IssueCredential(pb.IssueCredentialRequest(
            action_class="enrichment", target=f"{tag}-{i}", initiating_event=ev), timeout=30)

    for i in range(20):  # warm up the connection
        one(-i - 1)
    out = []
    for i in range(n):
        t = time.perf_counter()
        one(i)
        out.append((time.perf_counter() - t) * 1000)
    ch.close()
    return out


Opened = tuple[list[grpc.aio.Channel], list[asyncio.Task[None]]]


async def open_streams(addr: str, creds: Creds, n: int, arrivals: dict[str, list[float]],
                       concurrency: int = 64) -> Opened:
    """N WatchRevocations streams, each read by a task that notes when a freeze arrives."""
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            ch = aio_channel(addr, creds.for_id(f"spiffe://example.org/fleet/s{i}"))
            channels.append(ch)
            call = pb_grpc.CredentialBrokerStub(ch).WatchRevocations(pb.WatchRevocationsRequest())
            first = await call.read()
            assert first.HasField("sync"), first

        async def read() -> None:
            try:
                while True:
                    ev = await call.read()
                    if ev is grpc.aio.EOF:
                        return
                    if ev.HasField("frozen"):
                        arrivals.setdefault(ev.frozen.reason, []).append(time.perf_counter())
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass

        tasks.append(asyncio.create_task(read()))

    await asyncio.gather(*(one(i) for i in range(n)))
    return channels, tasks


async def fan_out(addr: str, creds: Creds, n: int, rounds: int,
                  arrivals: dict[str, list[float]]) -> list[tuple[float, list[float]]]:
    """Freeze (and unfreeze) a class ``rounds`` times; per round: (freeze call ms, arrival
    latencies in ms of every stream, from the moment the call was sent)."""
    ch = aio_channel(addr, creds.for_id(ADMIN))
    admin = pb_grpc.CredentialAdminStub(ch)
    out = []
    for r in range(rounds):
        reason = f"bench round {r}"
        sent = time.perf_counter()
        await admin.Freeze(pb.FreezeRequest(action_class="fleet.gated", reason=reason),
                           timeout=30)
        answered = (time.perf_counter() - sent) * 1000
        deadline = time.perf_counter() + 30
        while len(arrivals.get(reason, [])) < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        got = [(t - sent) * 1000 for t in arrivals.get(reason, [])]
        if len(got) < n:
            print(f"  round {r}: only {len(got)}/{n} streams heard the freeze within 30 s")
        out.append((answered, got))
        await admin.Unfreeze(pb.UnfreezeRequest(action_class="fleet.gated",
                                                reason="bench round over"), timeout=30)
        await asyncio.sleep(0.5)
    await ch.close()
    return out


async def approval_waits(addr: str, creds: Creds, n: int, concurrency: int = 64
                         ) -> tuple[list[grpc.aio.Channel], list[asyncio.Task[object]]]:
    """N identities each open an approval and wait for it (AwaitApproval, 60 s)."""
    channels: list[grpc.aio.Channel] = []
    waits: list[asyncio.Task[object]] = []
    gate = asyncio.Semaphore(concurrency)
    ev = pb.InitiatingEvent(source="bench", id="SCALE-APPROVAL")

    async def one(i: int) -> None:
        async with gate:
            ch = aio_channel(addr, creds.for_id(f"spiffe://example.org/fleet/w{i}"))
            channels.append(ch)
            stub = pb_grpc.CredentialBrokerStub(ch)
            resp = await stub.IssueCredential(pb.IssueCredentialRequest(
                action_class="fleet.gated", target=f"w{i}", initiating_event=ev), timeout=60)
            assert resp.approval.state == "pending", resp
        call = stub.AwaitApproval(
            pb.AwaitApprovalRequest(approval_id=resp.approval.id, wait_seconds=60), timeout=90)

        async def wait() -> object:
            return await call

        waits.append(asyncio.create_task(wait()))

    await asyncio.gather(*(one(i) for i in range(n)))
    return channels, waits


def start_broker(run: Path, bao: OpenBaoDev, wl_socket: str) -> tuple[subprocess.Popen[bytes], str]:
    (run / "scope-map.yaml").write_text(SCOPE_MAP)
    key = run / "audit.key"
    load_or_create_signing_key(key, create=True)
    ready = run / "broker.addr"
    log = (run / "broker.log").open("wb")
    env = {**os.environ, "VAULT_TOKEN": bao.root_token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli.main", "serve", "--listen", "127.0.0.1:0",
         "--workload-api", "unix:" + wl_socket, "--scope-map", str(run / "scope-map.yaml"),
         "--vault-addr", bao.addr, "--ready-file", str(ready),
         "--audit-log", str(run / "audit.log"), "--audit-key", str(key),
         "--registry", str(run / "registry.db"), "--admin-id", ADMIN,
         "--automation-id", ADMIN],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the broker did not start; see {run / 'broker.log'}")
        time.sleep(0.1)
    return proc, ready.read_text().strip()


async def run(args: argparse.Namespace, addr: str, ca: DevCA) -> None:
    creds = Creds(ca)
    agent = creds.for_id(AGENT)
    loop = asyncio.get_running_loop()

    def measure(tag: str) -> list[float]:
        return issuance_samples(addr, agent, args.samples, tag)

    idle = await loop.run_in_executor(None, measure, "idle")
    print(f"issuance, idle:                        {summary(idle)}")

    arrivals: dict[str, list[float]] = {}
    t = time.perf_counter()
    channels, readers = await open_streams(addr, creds, args.n, arrivals)
    print(f"{args.n} WatchRevocations streams open in {time.perf_counter() - t:.1f} s "
          f"(distinct SVIDs, one mTLS connection each)")
    loaded = await loop.run_in_executor(None, measure, "streams")
    print(f"issuance, {args.n} streams held:{' ' * max(0, 10 - len(str(args.n)))}    "
          f"{summary(loaded)}")
    print(f"  loaded/idle p99: {pct(loaded, 0.99) / pct(idle, 0.99):.2f}x "
          f"(p50 {statistics.median(loaded) / statistics.median(idle):.2f}x)")
    rounds = await fan_out(addr, creds, args.n, args.rounds, arrivals)
    all_arrivals = [x for _, got in rounds for x in got]
    for r, (answered, got) in enumerate(rounds):
        print(f"  fan-out round {r}: freeze answered {answered:6.1f} ms; {len(got)}/{args.n} "
              f"streams; p50 {statistics.median(got):6.1f} ms p99 {pct(got, 0.99):6.1f} ms "
              f"last {max(got):6.1f} ms")
    print(f"revocation fan-out to {args.n} streams: {summary(all_arrivals)}")
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in channels))

    await asyncio.sleep(1.0)
    t = time.perf_counter()
    channels, waits = await approval_waits(addr, creds, args.n)
    print(f"{args.n} approvals opened and awaited in {time.perf_counter() - t:.1f} s")
    await asyncio.sleep(1.0)
    assert not any(w.done() for w in waits), "an approval wait ended early"
    waiting = await loop.run_in_executor(None, measure, "approvals")
    print(f"issuance, {args.n} approval waits held:  {summary(waiting)}")
    print(f"  waiting/idle p99: {pct(waiting, 0.99) / pct(idle, 0.99):.2f}x")
    for w in waits:
        w.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in channels))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="streams (and approval waits) held")
    ap.add_argument("--samples", type=int, default=300, help="issuances per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="freezes whose fan-out is timed")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"bench_scale {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({cpu}); "
          f"Python {platform.python_version()}; grpcio {grpc.__version__}; N={args.n}; "
          f"open files limit {hard}")
    run_dir = Path(tempfile.mkdtemp(prefix="cbs-"))
    bao = OpenBaoDev(run_dir)
    bao.start()
    api = None
    proc = None
    try:
        ca = DevCA("example.org", now=datetime.now(UTC))
        api = DevWorkloadApi(ca, svid_ttl=timedelta(hours=2))
        wl_socket = str(run_dir / "wl-broker.sock")
        api.add_workload(BROKER, wl_socket, dns_names=(DEFAULT_BROKER_DNS,))
        api.start()
        proc, addr = start_broker(run_dir, bao, wl_socket)
        asyncio.run(run(args, addr, ca))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if api is not None:
            api.stop()
        bao.stop()


if __name__ == "__main__":
    main()
