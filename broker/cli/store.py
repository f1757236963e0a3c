"""``credbroker store migrate``: bring a credential store's schema to this version.

Brokers migrate at start too (PostgreSQL: under an advisory lock, so replicas starting
together migrate once); this command lets an operator do it first, e.g. from a Job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from broker.adapters.registry import SqlStore, open_store
from broker.config import process_env
from broker.errors import ConfigError


def store_from(args: argparse.Namespace, *, migrate: bool = True) -> SqlStore:
    """The store named by ``--store`` / ``--registry`` (or their environment variables).

    Raises: ConfigError (neither given), StoreError.
    """
    env = process_env()
    url = getattr(args, "store", None) or env.get("CREDBROKER_STORE", "")
    reg = getattr(args, "registry", None) or env.get("CREDBROKER_REGISTRY", "")
    if not url and not reg:
        raise ConfigError("no store: pass --store postgresql://… (CREDBROKER_STORE) or "
                          "--registry PATH (CREDBROKER_REGISTRY)")
    return open_store(url=url, registry=Path(reg) if reg else None, migrate=migrate,
                      pool_size=2)


def add_store_args(p: argparse.ArgumentParser, *, what: str = "the store") -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--store", metavar="URL",
                   help=f"{what}: PostgreSQL, postgresql://… ($CREDBROKER_STORE)")
    g.add_argument("--registry", metavar="PATH",
                   help=f"{what}: an SQLite file ($CREDBROKER_REGISTRY)")


def cmd_store_migrate(args: argparse.Namespace) -> int:
    store = store_from(args)  # opening migrates, under the store's lock
    try:
        before, after = store.migrated
        out: dict[str, Any] = {"store": getattr(store, "url", "") or str(
            getattr(store, "path", "")), "schema_version_before": before,
            "schema_version": after}
    finally:
        store.close()
    if args.json:
        print(json.dumps(out))
    elif before == after:
        print(f"{out['store']}: schema version {after}, current; nothing to do")
    else:
        print(f"{out['store']}: schema migrated from version {before or 'unversioned'} "
              f"to {after}")
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("store", help="the credential store (SQLite registry or PostgreSQL)")
    ssub = s.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    m = ssub.add_parser("migrate", help="bring the store's schema to this version "
                                        "(idempotent; brokers also do it at start)")
    add_store_args(m)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_store_migrate)
