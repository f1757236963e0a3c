"""Decision latency of the pure scope-map evaluation with 1,000 classes x 100 workload patterns.

    .venv/bin/python bench/bench_decide.py [--n 20000]

Each class lists 100 patterns (a mix of exact IDs, `*` segments and a final
`**`). Requests hit random classes; a quarter match the first pattern, a
quarter the last, a quarter one in the middle, and a quarter match none
(the worst case: every pattern is tried). No I/O, no server.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import UTC, datetime

import yaml

from broker.core.models import CredentialRequest, InitiatingEvent
from broker.core.scopemap import evaluate, parse_scope_map
from broker.core.spiffeid import SpiffeId


def build(classes: int, patterns: int) -> str:
    doc: dict[str, object] = {"apiVersion": "credbroker/v1", "kind": "ScopeMap",
                              "action_classes": {}}
    for c in range(classes):
        workloads = []
        for p in range(patterns):
            kind = p % 3
            if kind == 0:
                workloads.append(f"spiffe://example.org/ns/team{p}/sa/agent-{c}")
            elif kind == 1:
                workloads.append(f"spiffe://example.org/ns/team{p}/sa/*")
            else:
                workloads.append(f"spiffe://example.org/cluster/c{p}/**")
        doc["action_classes"][f"class{c}.act"] = {  # type: ignore[index]
            "risk": "high", "owner": {"team": "t", "contact": "t@example.org"},
            "escalation": ["oncall"], "workloads": workloads,
            "credential": {"ttl": "5m", "max_ttl": "10m", "vault_policy": [
                {"path": f"secret/data/c{c}/*", "capabilities": ["read"]}]},
        }
    return yaml.safe_dump(doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--patterns", type=int, default=100)
    args = ap.parse_args()
    t = time.perf_counter()
    m = parse_scope_map([("bench.yaml", build(args.classes, args.patterns))])
    load_s = time.perf_counter() - t
    rng = random.Random(7)  # noqa: S311 - picks benchmark requests, not secrets
    ids = [
        "spiffe://example.org/ns/team0/sa/agent-{c}",       # first pattern (exact)
        "spiffe://example.org/cluster/c98/x/y",             # pattern 98 of 100 (**)
        "spiffe://example.org/ns/team49/sa/whoever",        # a middle one (*)
        "spiffe://example.org/ns/nobody/sa/none",           # matches nothing: all 100 tried
    ]
    event = InitiatingEvent(source="siem", id="1")
    now = datetime.now(UTC)
    samples: dict[str, list[float]] = {k: [] for k in ("first", "late", "middle", "none")}
    for i in range(args.n):
        c = rng.randrange(args.classes)
        which = i % 4
        sid = SpiffeId.parse(ids[which].format(c=c))
        req = CredentialRequest(action_class=f"class{c}.act", initiating_event=event)
        t = time.perf_counter_ns()
        evaluate(m, sid, req, now)
        samples[list(samples)[which]].append((time.perf_counter_ns() - t) / 1000)
    every = [x for s in samples.values() for x in s]
    print(f"# decision latency, {args.classes} classes x {args.patterns} patterns, "
          f"{args.n} decisions, {datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, "
          f"Python {platform.python_version()}; map parsed in {load_s:.1f} s")
    print("| requests | p50 us | p99 us |")
    print("|---|---:|---:|")
    for name, s in [*samples.items(), ("all", every)]:
        q = sorted(s)
        print(f"| {name} | {statistics.median(s):.1f} | {q[int(0.99 * (len(q) - 1))]:.1f} |")
    print(f"\nall decisions p50 = {statistics.median(every):.1f} us (goal <= 50 us)")


if __name__ == "__main__":
    main()
