"""What every fault test checks, from outside the broker: OpenBao's own view of live tokens
against the registry file and the audit log file, and a broker run as a real process.

Nothing here prints or returns a token: only accessors (credential ids) and metadata.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import hvac
import hvac.exceptions

from broker.config import BrokerConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BrokerFiles:
    """Where one broker keeps what it knows: its registry and its audit log."""

    registry: Path
    audit: Path

    @classmethod
    def of(cls, cfg: BrokerConfig) -> BrokerFiles:
        return cls(registry=cfg.registry_path, audit=cfg.audit_path)


# -- OpenBao's view

@dataclass
class VaultView:
    """Live credbroker tokens as OpenBao sees them (root client, straight to OpenBao)."""

    root: hvac.Client
    foreign: set[str] = field(default_factory=set)  # accessors known not to be credbroker's

    def live_credbroker(self) -> dict[str, dict[str, str]]:
        """accessor -> metadata of every live token whose ``meta.credbroker == "1"``."""
        resp = self.root.list("auth/token/accessors")
        listed = set(resp["data"]["keys"]) if resp else set()
        self.foreign &= listed
        out: dict[str, dict[str, str]] = {}
        for accessor in listed - self.foreign:
            try:
                data = self.root.auth.token.lookup_accessor(accessor)["data"]
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath,
                    hvac.exceptions.Forbidden):
                continue  # gone since the listing (or never completed)
            meta = dict(data.get("meta") or {})
            if meta.get("credbroker") == "1":
                out[accessor] = meta
            else:
                self.foreign.add(accessor)
        return out

    def alive(self, accessor: str) -> bool:
        try:
            self.root.auth.token.lookup_accessor(accessor)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath,
                hvac.exceptions.Forbidden):
            return False
        return True


# -- the broker's files, read as an outsider

def registry_rows(path: Path) -> list[dict[str, object]]:
    """Every row of the ``credentials`` table (read-only; the broker may be running)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM credentials")]
    finally:
        db.close()


def registry_instance(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        (value,) = db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
        return str(value)
    finally:
        db.close()


def registry_ids(path: Path) -> set[str]:
    return {str(r["credential_id"]) for r in registry_rows(path) if r["credential_id"]}


def audit_records(path: Path) -> list[dict[str, object]]:
    """The audit log's records, one JSON line each: ``{"hash": ..., "record": {...}}``."""
    out = []
    with path.open("rb") as f:
        for line in f:
            if line.endswith(b"\n"):  # a partial last line is a write in progress
                out.append(json.loads(line)["record"])
    return out


def audited_ids(path: Path, types: Iterable[str] = ("credential.minted", "credential.revoked")
                ) -> set[str]:
    wanted = set(types)
    return {str(r["credential_id"]) for r in audit_records(path)
            if r.get("type") in wanted and r.get("credential_id")}


# -- the invariant

@dataclass
class Verdict:
    live: int  # live credbroker tokens in OpenBao
    untracked: dict[str, str]  # accessor -> what is missing (registry / audit log / broker)
    not_registered: set[str]  # handed out to an agent but absent from the registry
    not_audited: set[str]  # handed out to an agent but without a credential.minted record

    @property
    def ok(self) -> bool:
        return not (self.untracked or self.not_registered or self.not_audited)

    def __str__(self) -> str:
        return (f"{self.live} live credbroker token(s); untracked: {self.untracked}; "
                f"handed out but not in the registry: {sorted(self.not_registered)}; "
                f"handed out but not audited as minted: {sorted(self.not_audited)}")


def verdict(view: VaultView, brokers: Iterable[BrokerFiles],
            handed_out: Iterable[str] = ()) -> Verdict:
    """Every live credbroker token in OpenBao is in its broker's registry and named in its
    audit log (minted or revoked); every credential handed out is in the registry and was
    audited as minted."""
    by_instance = {registry_instance(b.registry): b for b in brokers if b.registry.exists()}
    untracked: dict[str, str] = {}
    files: dict[str, tuple[set[str], set[str]]] = {}
    live = view.live_credbroker()
    for accessor, meta in live.items():
        owner = by_instance.get(meta.get("broker_instance", ""))
        if owner is None:
            untracked[accessor] = f"minted by unknown broker {meta.get('broker_instance')!r}"
            continue
        key = str(owner.registry)
        if key not in files:
            files[key] = (registry_ids(owner.registry), audited_ids(owner.audit))
        registered, audited = files[key]
        missing = [w for w, ok in (("registry", accessor in registered),
                                   ("audit log", accessor in audited)) if not ok]
        if missing:
            untracked[accessor] = "not in the " + " nor the ".join(missing) + \
                f" (request_id {meta.get('request_id')})"
    handed = set(handed_out)
    all_registered: set[str] = set()
    all_minted: set[str] = set()
    for b in by_instance.values():
        all_registered |= registry_ids(b.registry)
        all_minted |= audited_ids(b.audit, ("credential.minted",))
    return Verdict(live=len(live), untracked=untracked,
                   not_registered=handed - all_registered, not_audited=handed - all_minted)


def settle(view: VaultView, brokers: Iterable[BrokerFiles], handed_out: Iterable[str] = (),
           timeout: float = 15.0) -> Verdict:
    """Poll until the invariant holds (the reconcile loop has run) or ``timeout`` passes."""
    brokers = list(brokers)
    handed = list(handed_out)
    deadline = time.monotonic() + timeout
    while True:
        v = verdict(view, brokers, handed)
        if v.ok or time.monotonic() > deadline:
            return v
        time.sleep(0.25)


def until(check: Callable[[], object], what: str, timeout: float = 15.0,
          every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting: {what}"
        time.sleep(every)


def error_code(err: grpc.RpcError) -> str:
    """The broker's stable error code from the trailing metadata (``credbroker-error-code``)."""
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "credbroker-error-code":
            return str(value)
    return ""


# -- a broker as a real process (it can be SIGKILLed)

class BrokerProcess:
    """``python -m broker.cli.main serve`` from this worktree, on the config's files."""

    def __init__(self, cfg: BrokerConfig, *, vault_token: str, log: Path) -> None:
        self.cfg = cfg
        self.ready = cfg.audit_path.parent / "ready"
        self.log = log
        self._token = vault_token
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> int:
        cfg = self.cfg
        self.ready.unlink(missing_ok=True)
        env = {**os.environ, "VAULT_TOKEN": self._token,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        args = [sys.executable, "-m", "broker.cli.main", "serve", "--listen", "127.0.0.1:0",
                "--workload-api", cfg.workload_api_socket, "--scope-map",
                str(cfg.scope_map_path), "--vault-addr", cfg.vault_addr, "--ready-file",
                str(self.ready), "--audit-log", str(cfg.audit_path), "--audit-key",
                str(cfg.audit_key_path)]
        args += ["--store", cfg.store_url] if cfg.store_url else \
            ["--registry", str(cfg.registry_path)]
        for admin in cfg.admin_ids:
            args += ["--admin-id", admin]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert self.proc.poll() is None, \
                f"the broker exited with {self.proc.returncode} at start-up: see {self.log}"
            assert time.monotonic() < deadline, f"the broker did not start: see {self.log}"
            time.sleep(0.05)
        self.port = int(self.ready.read_text().strip().rsplit(":", 1)[1])
        return self.port

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
