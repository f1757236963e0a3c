"""Issuance throughput: 32 agents over 4 sidecars vs 32 threads of raw creates, one OpenBao.

Runs the real dev stack (OpenBao dev, dev Workload API, one broker and four
sidecars as separate processes; four agent identities allowed ``enrichment``)
and measures, in one run, against the same OpenBao:

* raw creates: 32 threads in this process, each with its own hvac client, doing
  the Vault call the broker makes for a mint (a token-role create bound to an
  entity alias) as fast as they can, for ``--seconds``;
* issuances: 32 agent threads in this process, 8 per sidecar, each asking its
  sidecar for an ``enrichment`` credential with a new target every time (always a
  cache miss: sidecar → mTLS gRPC → broker → scope map → audit, registry → OpenBao),
  for ``--seconds``.

The ratio issuances/s ÷ creates/s is the issue's target (≥ 0.70). The rounds
alternate (raw, sidecar, raw, sidecar, ...) so both see the same machine; the
median of each is reported. ``--profile FILE`` records the broker with py-spy
during the last sidecar round (speedscope JSON; ``--profile-format raw`` for
collapsed stacks).

    .venv/bin/python bench/bench_throughput.py [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import hvac
import yaml

from credbroker_dev.devstack import EXAMPLE_SCOPE_MAP, DevStack
from sidecar.client import SidecarClient

AGENTS = 32
SIDECARS = 4
RAW_ROLE = "credbroker-bench-raw"


def bench_scope_map(path: Path, ids: list[str]) -> Path:
    """The example map, with the bench's agent identities allowed ``enrichment``."""
    doc = yaml.safe_load(EXAMPLE_SCOPE_MAP.read_text())
    doc["action_classes"]["enrichment"]["workloads"] = ids
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_for(seconds: float, warmup: float, workers: list[Callable[[], None]],
            pids: dict[str, list[int]]) -> tuple[float, dict[str, float]]:
    """Each worker called in a loop on a thread of its own: completed calls per second
    over ``seconds`` after ``warmup``, and the CPU milliseconds each group of ``pids``
    spent per call meanwhile. Raises RuntimeError on the first failed call."""
    stop = threading.Event()
    counts = [0] * len(workers)
    failures: list[str] = []

    def loop(i: int, fn: Callable[[], None]) -> None:
        while not stop.is_set():
            try:
                fn()
            except Exception as exc:  # a failed call ends the measurement
                failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                stop.set()
                return
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i, fn), daemon=True)
               for i, fn in enumerate(workers)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    cpu0 = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
    before, t0 = sum(counts), time.perf_counter()
    stop.wait(seconds)
    after, elapsed = sum(counts), time.perf_counter() - t0
    cpu1 = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
    stop.set()
    for t in threads:
        t.join(60)
    if failures:
        raise RuntimeError(f"{len(failures)} call(s) failed; first: {failures[0]}")
    calls = max(1, after - before)
    return calls / elapsed, {name: (cpu1[name] - cpu0[name]) * 1000 / calls for name in pids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before counting")
    ap.add_argument("--rounds", type=int, default=3, help="raw/sidecar pairs, alternated")
    ap.add_argument("--profile", type=Path, help="py-spy the broker in the last sidecar round")
    ap.add_argument("--profile-format", default="speedscope", choices=["speedscope", "raw"])
    ap.add_argument("--profile-cpu", action="store_true",
                    help="profile only what holds the GIL (the broker is one interpreter; "
                         "default: wall time, waits included)")
    args = ap.parse_args()
    names = [f"bench-{n}" for n in range(SIDECARS)]
    ids = [f"spiffe://example.org/agent/{n}" for n in names]
    run_dir = Path(tempfile.mkdtemp(prefix="cbt-"))
    stack = DevStack(run_dir=run_dir, workloads=dict(zip(names, ids, strict=True)),
                     scope_map=bench_scope_map(run_dir / "bench-map.yaml", ids))
    stack.start()
    raw_rates: list[float] = []
    issue_rates: list[float] = []
    raw_cpu: dict[str, float] = {}
    issue_cpu: dict[str, float] = {}
    try:
        info = json.loads((stack.run_dir / "dev.json").read_text())
        root = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
        # The body the broker writes for its token roles (broker.adapters.vault.VaultAdapter).
        root.write(f"auth/token/roles/{RAW_ROLE}", allowed_policies=["credbroker-enrichment"],
                   disallowed_policies=["root"], orphan=True, renewable=False,
                   token_explicit_max_ttl=900, token_no_default_policy=True,
                   token_type="service", allowed_entity_aliases=["spiffe://example.org/*"])

        def raw_worker(n: int) -> Callable[[], None]:
            vault = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
            sid = ids[n % SIDECARS]

            def create() -> None:
                vault.write(f"auth/token/create/{RAW_ROLE}", policies=["credbroker-enrichment"],
                            ttl="300s", explicit_max_ttl="300s", renewable=False,
                            no_default_policy=True, entity_alias=sid,
                            display_name="enrichment",
                            meta={"credbroker": "1", "action_class": "enrichment"})
            return create

        counter = iter(range(10**9))

        def agent(n: int) -> Callable[[], None]:
            sidecar = SidecarClient(info["sidecars"][names[n % SIDECARS]]["socket"])

            def ask() -> None:
                body = sidecar.request_credential("enrichment", target=f"t-{next(counter)}")
                if body.get("cached"):
                    raise RuntimeError("a new target was answered from the cache")
            return ask

        pid = stack.children[0].proc.pid  # the broker
        assert stack.bao is not None and stack.bao.child is not None
        pids = {"this process (agents or raw threads)": [os.getpid()],
                "OpenBao": [stack.bao.child.proc.pid], "broker": [pid],
                "4 sidecars": [c.proc.pid for c in stack.children if c.name.startswith("sidecar")]}
        for r in range(args.rounds):
            rate, raw_cpu = run_for(args.seconds, args.warmup,
                                    [raw_worker(n) for n in range(AGENTS)], pids)
            raw_rates.append(rate)
            spy = None
            if args.profile and r == args.rounds - 1:
                spy = subprocess.Popen(
                    [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                     "record", *(["--gil"] if args.profile_cpu else ["--idle"]), "-p", str(pid),
                     "-d", str(int(args.seconds)),
                     "-o", str(args.profile), "-f", args.profile_format],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rate, issue_cpu = run_for(args.seconds, args.warmup,
                                      [agent(n) for n in range(AGENTS)], pids)
            issue_rates.append(rate)
            if spy is not None:
                spy.wait(60)
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    raw, issued = statistics.median(raw_rates), statistics.median(issue_rates)
    print(f"# issuance throughput, {AGENTS} agents / {SIDECARS} sidecars, {args.rounds} rounds "
          f"of {args.seconds:.0f} s, {datetime.now(UTC):%Y-%m-%d}, {platform.machine()} "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print("| path | per second (median) | rounds |")
    print("|---|---:|---|")
    print(f"| raw creates, {AGENTS} threads (token-role create) | {raw:,.0f} | "
          f"{', '.join(f'{x:,.0f}' for x in raw_rates)} |")
    print(f"| issuances, {AGENTS} agents / {SIDECARS} sidecars, cache miss | {issued:,.0f} | "
          f"{', '.join(f'{x:,.0f}' for x in issue_rates)} |")
    print(f"\nissuances/s / raw creates/s = {issued / raw:.2f} (goal >= 0.70)")
    print("\nCPU ms per call, last round (2 cores = 2,000 ms per second):")
    print("| process | raw create | issuance |")
    print("|---|---:|---:|")
    for name in raw_cpu:
        print(f"| {name} | {raw_cpu[name]:.2f} | {issue_cpu[name]:.2f} |")


if __name__ == "__main__":
    main()
