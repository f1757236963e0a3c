"""The kill switch at scale: 10,000 live credentials of one identity, on one real OpenBao.

    .venv/bin/python bench/bench_freeze.py [--n 10000]

Measured in one run against the same OpenBao dev server:

* freeze: from the start of ``Responder.freeze`` (the admin API's work) until it
  returns, by which time the identity's Vault entity is disabled; then every one
  of the tokens is checked against Vault (not timed) to confirm it is refused;
* the freeze's background revocation of all of them: one ``sys/leases/revoke-prefix``
  call per (identity, class) over the identity's own token role's lease path (the
  credentials are minted through it), plus recording them in the registry and the log;
* ``sys/leases/revoke-prefix`` called directly over another 10,000 tokens of the same
  identity minted the same way (the target: the freeze's revocation within 1.0x of it);
* a naive loop of ``revoke-accessor`` over another 10,000.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import hvac
import hvac.exceptions

from broker.adapters.audit import AuditLog
from broker.adapters.registry import SqliteStore
from broker.adapters.vault import VaultAdapter, lease_prefix
from broker.app.responder import Responder, RevocationBus
from broker.core.scopemap import parse_scope_map
from broker.core.spiffeid import SpiffeId
from credbroker_dev.devstack import OpenBaoDev

MAP = """
apiVersion: credbroker/v1
kind: ScopeMap
action_classes:
  bench.{name}:
    risk: low
    owner: {{team: bench, contact: bench@example.org}}
    escalation: [nobody]
    workloads: [spiffe://example.org/agent/*]
    credential:
      ttl: 30m
      max_ttl: 60m
      vault_policy:
        - path: secret/data/bench/*
          capabilities: [read]
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="cbf-"))
    bao = OpenBaoDev(d)
    bao.start()
    try:
        run(bao, d, args.n)
    finally:
        bao.stop()


def run(bao: OpenBaoDev, d: Path, n: int) -> None:
    vault = VaultAdapter(addr=bao.addr, token=bao.root_token, timeout=30)
    maps = {name: parse_scope_map([(f"{name}.yaml", MAP.format(name=name))])
            for name in ("freeze", "prefix", "loop")}
    for m in maps.values():
        vault.sync_scope_map(m)
    root = hvac.Client(url=bao.addr, token=bao.root_token)
    root.secrets.kv.v2.create_or_update_secret(path="bench/x", secret={"k": "v"})
    store = SqliteStore(d / "registry.db")
    audit = AuditLog(d / "audit.log")
    now = datetime.now(UTC)
    rogue = SpiffeId.parse("spiffe://example.org/agent/rogue")
    pool = ThreadPoolExecutor(16)

    def mint(name: str, record: bool) -> tuple[str, str]:
        cls = maps[name].classes[f"bench.{name}"]
        rid = uuid.uuid4().hex
        if record:
            store.record_intent(request_id=rid, spiffe_id=str(rogue), action_class=cls.name,
                                target="", event_source="", event_id="", at=now)
        t = vault.mint(cls=cls, spiffe_id=rogue, ttl_seconds=1800,
                       metadata={"request_id": rid, "broker_instance": store.instance_id},
                       now=now)
        if record:
            store.record_minted(request_id=rid, credential_id=t.accessor,
                                expires_at=now + timedelta(seconds=1800), entity_id=t.entity_id,
                                lease_prefix=t.lease_prefix)
        return t.accessor, t.token

    t0 = time.perf_counter()
    frozen = list(pool.map(lambda _: mint("freeze", True), range(n)))
    prefix = list(pool.map(lambda _: mint("prefix", False), range(n)))
    loop = list(pool.map(lambda _: mint("loop", False), range(n)))
    print(f"minted {len(frozen) + len(prefix) + len(loop)} tokens in "
          f"{time.perf_counter() - t0:.1f} s")

    responder = Responder(store=store, vault=vault, audit=audit, bus=RevocationBus(),
                          scope_map=lambda: maps["freeze"], clock=lambda: datetime.now(UTC))
    t0 = time.perf_counter()
    res = responder.freeze(spiffe_id=str(rogue), action_class="", reason="bench", by="bench")
    matched, entities = res.credentials_matched, res.entities_disabled
    freeze_s = time.perf_counter() - t0
    assert responder.last_freeze_revocation is not None
    responder.last_freeze_revocation.join()
    revoke_s = time.perf_counter() - t0

    def refused(token: str) -> bool:
        try:
            hvac.Client(url=bao.addr, token=token).secrets.kv.v2.read_secret_version(
                path="bench/x", raise_on_deleted_version=False)
            return False
        except hvac.exceptions.Forbidden:
            return True

    sample = [tok for _, tok in frozen]
    refused_count = sum(pool.map(refused, sample))

    t0 = time.perf_counter()
    root.sys.revoke_prefix(lease_prefix(maps["prefix"].classes["bench.prefix"], str(rogue)))
    prefix_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for accessor, _ in loop:
        root.auth.token.revoke_accessor(accessor)
    loop_s = time.perf_counter() - t0
    print(f"# kill switch, {n} live credentials of one identity, "
          f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, OpenBao dev")
    print("| what | seconds | vs revoke-prefix |")
    print("|---|---:|---:|")
    print(f"| freeze returns: entity disabled, all {matched} refused by Vault "
          f"({refused_count}/{n} confirmed after) | {freeze_s:.3f} | |")
    print(f"| freeze's full revocation of all {n} (revoke-prefix per identity and class, "
          f"recorded and audited) | {revoke_s:.2f} | {revoke_s / prefix_s:.2f}x |")
    print(f"| sys/leases/revoke-prefix over {n} tokens of one identity's role | {prefix_s:.2f} "
          "| 1.00x |")
    print(f"| naive revoke-accessor loop over {n} | {loop_s:.2f} | {loop_s / prefix_s:.2f}x |")
    print(f"(entities disabled: {entities})")
    responder.close()
    store.close()
    audit.close()


if __name__ == "__main__":
    main()
