"""Configuration values, validated at the edge (defaults → environment → flags).

Library code never reads ``os.environ``: the CLI builds these with
:func:`broker_config_from` / :func:`sidecar_config_from` and passes them down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from broker.approvers import ApproverConfig
from broker.core.scopemap import (
    DEFAULT_VAULT_ALLOWED_MOUNTS,
    ScopeMap,
    normalize_allowed_mounts,
    parse_scope_map,
)
from broker.core.spiffeid import SpiffeId
from broker.errors import ConfigError, InvalidSpiffeIdError

DEFAULT_AUDIENCE = "credbroker"
DEFAULT_BROKER_DNS = "broker.credbroker.internal"
DEFAULT_RESPONDER_GROUPS = ("responders",)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    listen: str  # host:port; port 0 picks a free one
    workload_api_socket: str  # unix:/path
    scope_map_path: Path
    vault_addr: str
    vault_token: str  # secret: never log it (repr hides it)
    vault_token_file: Path | None = None  # re-read when it changes (Vault Agent sink)
    vault_ca_cert: Path | None = None  # PEM CA bundle that Vault's TLS certificate chains to
    jwt_audience: str = DEFAULT_AUDIENCE
    require_jwt_svid: bool = False
    ready_file: Path | None = None
    reload_interval: float = 1.0  # seconds between scope-map change checks; 0 disables
    audit_path: Path
    registry_path: Path
    #: postgresql://… : the registry shared by several replicas (wins over registry_path).
    store_url: str = ""
    admin_ids: tuple[str, ...] = ()
    #: People (ID-token groups) who may revoke, freeze and unfreeze.
    responder_groups: tuple[str, ...] = DEFAULT_RESPONDER_GROUPS
    #: SPIFFE IDs that may revoke, freeze and unfreeze with no person (``automation:<id>``).
    automation_ids: tuple[str, ...] = ()
    #: Threads for blocking work (Vault, sqlite, the audit log's fsync). Revocation streams
    #: and approval waits hold none of them (they wait on the asyncio loop).
    max_workers: int = 64
    approvers: ApproverConfig = field(default_factory=ApproverConfig)
    metrics_listen: str = ""  # host:port for /metrics; empty: no metrics server
    health_listen: str = ""  # host:port for a plaintext gRPC health endpoint (kubelet probes)
    health_interval: float = 2.0
    audit_key_path: Path | None = None  # Ed25519 PEM; created (0600) when missing
    checkpoint_mirror: Path | None = None
    checkpoint_interval: float = 60.0
    #: Mounts a class's vault_policy may reach (normalized, "secret/"); never sys/auth/identity.
    vault_allowed_mounts: tuple[str, ...] = DEFAULT_VAULT_ALLOWED_MOUNTS
    vault_drift_interval: float = 30.0  # seconds between Vault drift checks; 0 disables

    def __repr__(self) -> str:
        return (f"BrokerConfig(listen={self.listen!r}, scope_map_path={self.scope_map_path!r}, "
                f"vault_addr={self.vault_addr!r}, vault_token=<redacted>)")


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarConfig:
    listen_socket: Path  # the agent-facing unix socket
    workload_api_socket: str
    broker_addr: str  # host:port
    broker_dns_name: str = DEFAULT_BROKER_DNS
    jwt_audience: str = DEFAULT_AUDIENCE
    send_jwt_svid: bool = True
    broker_timeout: float = 10.0


def _socket(value: str, what: str) -> str:
    if not value:
        raise ConfigError(
            f"{what} is not set: pass --workload-api unix:/path or set SPIFFE_ENDPOINT_SOCKET"
        )
    path = value.removeprefix("unix:")
    if not path.startswith("/"):
        raise ConfigError(f"{what} {value!r} must be an absolute unix socket path (unix:/path)")
    return "unix:" + path


def _hostport(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {value!r} must be host:port, e.g. 127.0.0.1:8443")
    return value


def vault_settings(*, env: Mapping[str, str], vault_addr: str | None,
                   vault_token_file: str | None) -> tuple[str, str]:
    """Vault address and token (from --vault-token-file or VAULT_TOKEN, never a flag value).

    Raises:
        ConfigError: either is missing or the token file is unreadable.
    """
    token = ""
    if vault_token_file:
        try:
            token = Path(vault_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --vault-token-file {vault_token_file}: "
                              f"{exc.strerror}") from None
    token = token or env.get("VAULT_TOKEN", "")
    if not token:
        raise ConfigError("no Vault token: set VAULT_TOKEN or pass --vault-token-file PATH")
    addr = vault_addr or env.get("VAULT_ADDR", "")
    if not addr.startswith(("http://", "https://")):
        raise ConfigError("Vault address is not set or not a URL: set VAULT_ADDR or pass "
                          "--vault-addr https://vault.example:8200")
    return addr.rstrip("/"), token


def vault_ca_cert_from(*, env: Mapping[str, str], flag: str | None) -> Path | None:
    """The CA bundle to verify Vault's TLS certificate with, like ``bao`` finds it:
    ``--vault-ca-cert``, else ``VAULT_CACERT``, else ``BAO_CACERT``; None: the system's.

    Raises:
        ConfigError: the file named cannot be read.
    """
    given = flag or env.get("VAULT_CACERT", "") or env.get("BAO_CACERT", "")
    if not given:
        return None
    path = Path(given)
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise ConfigError(f"cannot read the Vault CA certificate {given} (--vault-ca-cert / "
                          f"VAULT_CACERT): {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(f"the Vault CA certificate {given} (--vault-ca-cert / VAULT_CACERT) "
                          "is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    return path


def vault_allowed_mounts_from(*, env: Mapping[str, str],
                              flags: list[str] | None) -> tuple[str, ...]:
    """The Vault mounts scope maps may reach: the flags, else the environment, else the default.

    ``--vault-allowed-mount`` (repeatable) wins over ``CREDBROKER_VAULT_ALLOWED_MOUNTS``
    (comma-separated); with neither, :data:`DEFAULT_VAULT_ALLOWED_MOUNTS` (``secret/``).

    Raises:
        ConfigError: an entry is not a mount path or names Vault's control plane.
    """
    given = list(flags or []) or [m for m in env.get("CREDBROKER_VAULT_ALLOWED_MOUNTS",
                                                      "").split(",") if m.strip()]
    try:
        return normalize_allowed_mounts(given or DEFAULT_VAULT_ALLOWED_MOUNTS)
    except ValueError as exc:
        raise ConfigError(f"--vault-allowed-mount: {exc}") from None


def broker_config_from(
    *,
    env: Mapping[str, str],
    listen: str | None = None,
    workload_api: str | None = None,
    scope_map: str | None = None,
    vault_addr: str | None = None,
    vault_token_file: str | None = None,
    vault_ca_cert: str | None = None,
    jwt_audience: str | None = None,
    require_jwt_svid: bool = False,
    ready_file: str | None = None,
    audit_log: str | None = None,
    audit_key: str | None = None,
    checkpoint_mirror: str | None = None,
    checkpoint_interval: float | None = None,
    registry: str | None = None,
    store: str | None = None,
    admin_ids: list[str] | None = None,
    approver_issuer: str | None = None,
    approver_jwks: str | None = None,
    approver_audience: str | None = None,
    approver_groups: str | None = None,
    approval_bots: list[str] | None = None,
    owner_team_cannot_approve: bool = False,
    escalation_webhook: str | None = None,
    metrics_listen: str | None = None,
    health_listen: str | None = None,
    vault_allowed_mounts: list[str] | None = None,
    vault_drift_interval: float | None = None,
    responder_groups: list[str] | None = None,
    automation_ids: list[str] | None = None,
) -> BrokerConfig:
    """Build and validate broker configuration.

    The Vault token comes from ``--vault-token-file`` or ``VAULT_TOKEN`` (never
    a command-line value, which other users could read from the process list).

    Raises:
        ConfigError: something is missing or malformed; the message says what to set.
    """
    addr, token = vault_settings(env=env, vault_addr=vault_addr,
                                 vault_token_file=vault_token_file)
    sm = scope_map or env.get("CREDBROKER_SCOPE_MAP", "")
    if not sm:
        raise ConfigError("no scope map: pass --scope-map PATH or set CREDBROKER_SCOPE_MAP")
    audit = audit_log or env.get("CREDBROKER_AUDIT_LOG", "")
    if not audit:
        raise ConfigError("no audit log: pass --audit-log PATH or set CREDBROKER_AUDIT_LOG "
                          "(the broker does not run without one)")
    key = audit_key or env.get("CREDBROKER_AUDIT_KEY", "")
    if not key:
        raise ConfigError("no checkpoint signing key: pass --audit-key PATH or set "
                          "CREDBROKER_AUDIT_KEY (an Ed25519 PEM key; created if missing)")
    reg = registry or env.get("CREDBROKER_REGISTRY", "")
    store_url = store or env.get("CREDBROKER_STORE", "")
    if store_url:
        from broker.store_pg import check_url

        check_url(store_url)
    elif not reg:
        raise ConfigError("no credential registry: pass --registry PATH (an SQLite file) or set "
                          "CREDBROKER_REGISTRY; or --store postgresql://… (CREDBROKER_STORE) "
                          "for replicas sharing one")
    admins = list(admin_ids or []) + [a for a in env.get("CREDBROKER_ADMIN_IDS", "").split(",")
                                      if a.strip()]
    for a in admins:
        try:
            SpiffeId.parse(a.strip())
        except InvalidSpiffeIdError as exc:
            raise ConfigError(f"--admin-id: {exc}") from None
    automation = list(automation_ids or []) or [
        a for a in env.get("CREDBROKER_AUTOMATION_IDS", "").split(",") if a.strip()]
    for a in automation:
        try:
            SpiffeId.parse(a.strip())
        except InvalidSpiffeIdError as exc:
            raise ConfigError(f"--automation-id: {exc}") from None
    groups = [g.strip() for g in (responder_groups or env.get(
        "CREDBROKER_RESPONDER_GROUPS", "").split(",")) if g.strip()]
    approvers = _approver_config(
        issuer=approver_issuer or env.get("CREDBROKER_APPROVER_ISSUER", ""),
        jwks=approver_jwks or env.get("CREDBROKER_APPROVER_JWKS", ""),
        audience=approver_audience or "credbroker-approvals", groups_file=approver_groups,
        bots=approval_bots or [], owner_team_cannot_approve=owner_team_cannot_approve,
        webhook=escalation_webhook or env.get("CREDBROKER_ESCALATION_WEBHOOK", ""))
    interval = checkpoint_interval if checkpoint_interval is not None else 60.0
    if interval <= 0:
        raise ConfigError("--checkpoint-interval must be a positive number of seconds")
    drift = vault_drift_interval if vault_drift_interval is not None else 30.0
    if drift < 0:
        raise ConfigError("--vault-drift-interval must be a number of seconds (0 disables)")
    return BrokerConfig(
        listen=_hostport(listen or env.get("CREDBROKER_LISTEN", "127.0.0.1:8443"), "--listen"),
        workload_api_socket=_socket(workload_api or env.get("SPIFFE_ENDPOINT_SOCKET", ""),
                                    "Workload API socket"),
        scope_map_path=Path(sm),
        vault_addr=addr,
        vault_token_file=Path(vault_token_file) if vault_token_file else None,
        vault_token=token,
        vault_ca_cert=vault_ca_cert_from(env=env, flag=vault_ca_cert),
        jwt_audience=jwt_audience or env.get("CREDBROKER_AUDIENCE", DEFAULT_AUDIENCE),
        require_jwt_svid=require_jwt_svid,
        ready_file=Path(ready_file) if ready_file else None,
        audit_path=Path(audit),
        registry_path=Path(reg),
        store_url=store_url,
        admin_ids=tuple(a.strip() for a in admins),
        responder_groups=tuple(dict.fromkeys(groups)) or DEFAULT_RESPONDER_GROUPS,
        automation_ids=tuple(a.strip() for a in automation),
        approvers=approvers,
        metrics_listen=_hostport(metrics_listen, "--metrics-listen") if metrics_listen else "",
        health_listen=_hostport(health_listen, "--health-listen") if health_listen else "",
        audit_key_path=Path(key),
        checkpoint_mirror=Path(checkpoint_mirror) if checkpoint_mirror else None,
        checkpoint_interval=interval,
        vault_allowed_mounts=vault_allowed_mounts_from(env=env, flags=vault_allowed_mounts),
        vault_drift_interval=drift,
    )


def _approver_config(*, issuer: str, jwks: str, audience: str, groups_file: str | None,
                     bots: list[str], owner_team_cannot_approve: bool,
                     webhook: str) -> ApproverConfig:
    """Raises: ConfigError for an incomplete issuer, a bad groups file or a bad bot entry."""
    if bool(issuer) != bool(jwks):
        raise ConfigError("approver OIDC needs both --approver-issuer URL and --approver-jwks "
                          "FILE (the issuer's JWKS)")
    static: dict[str, tuple[str, ...]] = {}
    if groups_file:
        try:
            loaded = yaml.safe_load(Path(groups_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read --approver-groups {groups_file}: {exc}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, list) for v in loaded.values()):
            raise ConfigError(f"--approver-groups {groups_file} must map each approver to a "
                              "list of groups, e.g. alice@example.org: [ir-leads]")
        static = {str(k): tuple(map(str, v)) for k, v in loaded.items()}
    bot_groups: dict[str, tuple[str, ...]] = {}
    for entry in bots:
        sid, sep, groups = entry.partition("=")
        try:
            SpiffeId.parse(sid)
        except InvalidSpiffeIdError as exc:
            raise ConfigError(f"--approval-bot {entry!r}: {exc}") from None
        if not sep or not groups:
            raise ConfigError(f"--approval-bot {entry!r} must be SPIFFE_ID=group[,group...]")
        bot_groups[sid] = tuple(g.strip() for g in groups.split(",") if g.strip())
    if webhook and not webhook.startswith(("http://", "https://")):
        raise ConfigError(f"--escalation-webhook {webhook!r} must be an http(s) URL")
    return ApproverConfig(issuer=issuer, audience=audience,
                          jwks_path=Path(jwks) if jwks else None, static_groups=static,
                          bots=bot_groups, owner_team_may_approve=not owner_team_cannot_approve,
                          webhook_url=webhook)


def sidecar_config_from(
    *,
    env: Mapping[str, str],
    listen: str | None = None,
    workload_api: str | None = None,
    broker: str | None = None,
    broker_dns_name: str | None = None,
    jwt_audience: str | None = None,
    no_jwt_svid: bool = False,
) -> SidecarConfig:
    """Build and validate sidecar configuration.

    Raises:
        ConfigError: something is missing or malformed.
    """
    sock = listen or env.get("CREDBROKER_SIDECAR_SOCKET", "")
    if not sock:
        raise ConfigError("no agent socket: pass --listen /run/credbroker/sidecar.sock")
    return SidecarConfig(
        listen_socket=Path(sock.removeprefix("unix:")),
        workload_api_socket=_socket(workload_api or env.get("SPIFFE_ENDPOINT_SOCKET", ""),
                                    "Workload API socket"),
        broker_addr=_hostport(broker or env.get("CREDBROKER_BROKER_ADDR", ""), "--broker"),
        broker_dns_name=broker_dns_name or env.get("CREDBROKER_BROKER_DNS", DEFAULT_BROKER_DNS),
        jwt_audience=jwt_audience or env.get("CREDBROKER_AUDIENCE", DEFAULT_AUDIENCE),
        send_jwt_svid=not no_jwt_svid,
    )


def load_scope_map(
    path: Path, *, vault_allowed_mounts: tuple[str, ...] = DEFAULT_VAULT_ALLOWED_MOUNTS
) -> ScopeMap:
    """Read a scope-map file, or every ``*.yaml``/``*.yml`` file of a directory.

    ``vault_allowed_mounts`` (from :func:`vault_allowed_mounts_from`) bounds what
    the classes' Vault policies may reach.

    Raises:
        ConfigError: the path cannot be read, or the allowed mounts are invalid.
        ScopeMapError: the documents are not a valid scope map.
    """
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not files:
                raise ConfigError(f"scope-map directory {path} holds no *.yaml files")
        else:
            files = [path]
        docs = [(str(p), p.read_text()) for p in files]
    except OSError as exc:
        raise ConfigError(f"cannot read scope map {path}: {exc.strerror}") from None
    try:
        return parse_scope_map(docs, vault_allowed_mounts=vault_allowed_mounts)
    except ValueError as exc:
        raise ConfigError(f"--vault-allowed-mount: {exc}") from None


def process_env() -> Mapping[str, str]:
    """The process environment; called only by the CLI edge."""
    return os.environ
