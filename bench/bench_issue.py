"""Issuance latency through the sidecar vs a raw hvac mint, against one real OpenBao.

Runs the real dev stack (OpenBao dev, dev Workload API, broker and sidecar as
separate processes) and measures, in one run:

* raw mint: the same Vault call the broker makes (token-role create bound to an
  entity alias), straight from hvac in this process;
* cache miss: POST /v1/credentials through the sidecar with a new target each
  time (sidecar → mTLS gRPC → broker → scope map → OpenBao);
* cache hit: the same request again, answered from the sidecar's cache.

    .venv/bin/python bench/bench_issue.py [--n 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import hvac

from credbroker_dev.devstack import DevStack
from sidecar.client import SidecarClient


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="requests per measurement")
    args = ap.parse_args()
    stack = DevStack(run_dir=Path(tempfile.mkdtemp(prefix="cbb-")))
    stack.start()
    try:
        info = json.loads((stack.run_dir / "dev.json").read_text())
        vault = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
        sidecar = SidecarClient(info["sidecars"]["triage"]["socket"])
        sid = info["sidecars"]["triage"]["spiffe_id"]

        def raw_mint() -> None:
            vault.write("auth/token/create/credbroker-enrichment",
                        policies=["credbroker-enrichment"], ttl="300s", renewable=False,
                        no_default_policy=True, entity_alias=sid,
                        meta={"credbroker": "1", "action_class": "enrichment"})

        counter = iter(range(10**9))

        def miss() -> None:
            sidecar.request_credential("enrichment", target=f"bench-{next(counter)}")

        def hit() -> None:
            sidecar.request_credential("enrichment", target="bench-hit")

        def measure(fn: object, n: int) -> list[float]:
            for _ in range(20):  # warm up connections and caches
                fn()  # type: ignore[operator]
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()  # type: ignore[operator]
                out.append((time.perf_counter() - t) * 1000)
            return out

        raw = measure(raw_mint, args.n)
        cold = measure(miss, args.n)
        warm = measure(hit, args.n)
    finally:
        stack.stop()

    rows = [("raw hvac mint (token-role create)", raw), ("sidecar, cache miss", cold),
            ("sidecar, cache hit", warm)]
    print(f"# issuance latency, {args.n} requests each, {datetime.now(UTC):%Y-%m-%d}, "
          f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| path | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {statistics.median(s):.2f} | {pct(s, 0.99):.2f} |")
    ratio = statistics.median(cold) / statistics.median(raw)
    print(f"\ncache miss p50 / raw mint p50 = {ratio:.2f}x (goal <= 1.5x); "
          f"cache hit p99 = {pct(warm, 0.99):.2f} ms (goal <= 1 ms)")


if __name__ == "__main__":
    main()
