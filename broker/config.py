"""Configuration values, validated at the edge (flags > environment > config file > defaults).

Each option is declared once, in :mod:`broker.options`; this module turns the resolved
values into a validated BrokerConfig (the sidecar's: ``sidecar.config``). Library code
never reads ``os.environ``: the CLI builds these with :func:`broker_config_from` and
passes them down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from broker.adapters.approvers import ApproverConfig
from broker.adapters.environments import (
    EnvironmentConfig,
    check_environments,
    check_name,
    parse_environment_flag,
)
from broker.core.scopemap import (
    DEFAULT_VAULT_ALLOWED_MOUNTS,
    ScopeMap,
    normalize_allowed_mounts,
    parse_scope_map,
)
from broker.core.spiffeid import SpiffeId
from broker.errors import ConfigError, InvalidSpiffeIdError
from broker.options import (
    BROKER_OPTIONS,
    DEFAULT_AUDIENCE,
    DEFAULT_RESPONDER_GROUPS,
    VAULT_ALLOWED_MOUNT,
    VAULT_SYNC_OPTIONS,
    Setting,
    hostport_value,
    resolve,
    socket_value,
    text_value,
)
from broker.wire.federation import (
    FederatedBundles,
    FederationSource,
    parse_bundle_flag,
    parse_endpoint_flag,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    listen: str  # host:port; port 0 picks a free one
    workload_api_socket: str  # unix:/path
    scope_map_path: Path
    vault_addr: str
    vault_token: str  # secret: never log it (repr hides it)
    vault_token_file: Path | None = None  # re-read when it changes (Vault Agent sink)
    vault_ca_cert: Path | None = None  # PEM CA bundle that Vault's TLS certificate chains to
    #: The environment of the --vault-addr Vault (requests naming none go there).
    default_environment: str = "default"
    #: Environments besides the default one, each with its own Vault; () : none declared.
    environments: tuple[EnvironmentConfig, ...] = ()
    jwt_audience: str = DEFAULT_AUDIENCE
    require_jwt_svid: bool = False
    ready_file: Path | None = None
    reload_interval: float = 1.0  # seconds between scope-map change checks; 0 disables
    #: The audit log file (None with a PostgreSQL store: the log is in the database).
    audit_path: Path | None
    registry_path: Path
    #: postgresql://… : the registry shared by several replicas (wins over registry_path).
    store_url: str = ""
    admin_ids: tuple[str, ...] = ()
    #: People (ID-token groups) who may revoke, freeze and unfreeze.
    responder_groups: tuple[str, ...] = DEFAULT_RESPONDER_GROUPS
    #: SPIFFE IDs that may revoke, freeze and unfreeze with no person (``automation:<id>``).
    automation_ids: tuple[str, ...] = ()
    #: Team-scoped responders and approvers: group or SPIFFE ID -> teams
    #: (:mod:`broker.core.teams`); who is not listed acts for every team.
    team_scopes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
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
    #: Foreign trust domains trusted through SPIFFE federation (bundle files, endpoints).
    federation: tuple[FederationSource, ...] = ()

    def __repr__(self) -> str:
        return (f"BrokerConfig(listen={self.listen!r}, scope_map_path={self.scope_map_path!r}, "
                f"vault_addr={self.vault_addr!r}, vault_token=<redacted>)")


def _vault(s: Mapping[str, Setting]) -> tuple[str, str, Path | None]:
    """Vault address, token and the token file (None: the token came from VAULT_TOKEN).

    The token is one setting spelled two ways, ``--vault-token-file`` (flag or config
    file) and ``VAULT_TOKEN``; the one from the stronger source wins.

    Raises:
        ConfigError: either is missing or the token file is unreadable.
    """
    token_file, env_token = s["vault_token_file"], s["vault_token"]
    token, path = "", None
    if token_file.value and token_file.rank >= env_token.rank:
        path = Path(str(token_file.value))
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --vault-token-file {path}: "
                              f"{exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--vault-token-file {path} is not a text file (a Vault token "
                              "is text): write the token alone into it") from None
    token = token or str(env_token.value or "")
    if not token:
        raise ConfigError("no Vault token: set VAULT_TOKEN or pass --vault-token-file PATH")
    addr = str(s["vault_addr"].value or "")
    if not addr.startswith(("http://", "https://")):
        raise ConfigError("Vault address is not set or not a URL: set VAULT_ADDR or pass "
                          "--vault-addr https://vault.example:8200")
    return addr.rstrip("/"), token, path


def _vault_ca_cert(s: Mapping[str, Setting]) -> Path | None:
    """The CA bundle to verify Vault's TLS certificate with, like ``bao`` finds it:
    ``--vault-ca-cert``, else ``VAULT_CACERT``, else ``BAO_CACERT``; None: the system's.

    Raises:
        ConfigError: the file named cannot be read.
    """
    given = str(s["vault_ca_cert"].value or "")
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


def _allowed_mounts(s: Mapping[str, Setting]) -> tuple[str, ...]:
    """Raises: ConfigError for an entry that is not a mount path or is Vault's control plane."""
    given = s["vault_allowed_mount"].value
    try:
        return normalize_allowed_mounts(given if isinstance(given, tuple) and given
                                        else DEFAULT_VAULT_ALLOWED_MOUNTS)
    except ValueError as exc:
        raise ConfigError(f"--vault-allowed-mount: {exc}") from None


def vault_allowed_mounts_from(*, env: Mapping[str, str],
                              flags: list[str] | None) -> tuple[str, ...]:
    """The Vault mounts scope maps may reach: the flags, else the environment, else the default.

    Raises:
        ConfigError: an entry is not a mount path or names Vault's control plane.
    """
    return _allowed_mounts(resolve((VAULT_ALLOWED_MOUNT,), flags={VAULT_ALLOWED_MOUNT.name: flags},
                                   env=env, file={}))


@dataclass(frozen=True, slots=True, kw_only=True)
class VaultAccess:
    addr: str
    token: str  # secret: never log it (repr hides it)
    ca_cert: Path | None
    allowed_mounts: tuple[str, ...]
    scope_map: str
    default_environment: str = "default"
    environments: tuple[EnvironmentConfig, ...] = ()

    def __repr__(self) -> str:
        return f"VaultAccess(addr={self.addr!r}, token=<redacted>)"


def vault_access_from(*, env: Mapping[str, str], flags: Mapping[str, object]) -> VaultAccess:
    """What `credbroker vault sync` needs, from the broker's own option declarations.

    Raises:
        ConfigError: something is missing or malformed.
    """
    s = resolve(VAULT_SYNC_OPTIONS, flags=flags, env=env, file={})
    addr, token, _ = _vault(s)
    sm = str(s["scope_map"].value or "")
    if not sm:
        raise ConfigError("no scope map: pass --scope-map PATH or set CREDBROKER_SCOPE_MAP")
    default_env, extra_envs = _environments(s, env)
    return VaultAccess(addr=addr, token=token, ca_cert=_vault_ca_cert(s),
                       allowed_mounts=_allowed_mounts(s), scope_map=sm,
                       default_environment=default_env, environments=extra_envs)


def _number(s: Mapping[str, Setting], name: str) -> float:
    value = s[name].value
    return float(value) if isinstance(value, int | float) else 0.0


def _list(s: Mapping[str, Setting], name: str) -> tuple[str, ...]:
    value = s[name].value
    return tuple(dict.fromkeys(value)) if isinstance(value, tuple) else ()


def _federation(s: Mapping[str, Setting]) -> tuple[FederationSource, ...]:
    """Raises: ConfigError for a malformed entry or a trust domain federated twice."""
    sources = [*(parse_bundle_flag(t) for t in _list(s, "federated_bundle")),
               *(parse_endpoint_flag(t) for t in _list(s, "federation_endpoint"))]
    FederatedBundles(sources)  # checks each trust domain appears once
    return tuple(sources)


def _spiffe_ids(ids: tuple[str, ...], flag: str) -> tuple[str, ...]:
    for a in ids:
        try:
            SpiffeId.parse(a)
        except InvalidSpiffeIdError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    return ids


def _team_scopes(entries: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``WHO=TEAM[+TEAM]`` entries as WHO -> teams (a WHO given twice gets both lists).

    Raises: ConfigError for an entry without ``=`` or teams, or a bad SPIFFE ID as WHO.
    """
    out: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        who, sep, teams = (p.strip() for p in entry.partition("="))
        names = tuple(t.strip() for t in teams.split("+") if t.strip())
        if not sep or not who or not names:
            raise ConfigError(f"--team-scope {entry!r} must be WHO=TEAM[+TEAM], e.g. "
                              "team-a-oncall=team-a (WHO: a group, or the SPIFFE ID of "
                              "automation or an approval bot)")
        if who.startswith("spiffe://"):
            _spiffe_ids((who,), "--team-scope")
        out[who] = tuple(dict.fromkeys((*out.get(who, ()), *names)))
    return out


def broker_config_from(*, env: Mapping[str, str], flags: Mapping[str, object] | None = None,
                       file: Mapping[str, object] | None = None) -> BrokerConfig:
    """Build and validate broker configuration from :data:`BROKER_OPTIONS`.

    ``flags`` and ``file`` map option names (argparse dests, config-file keys) to values;
    each option is taken from the flags, else the environment, else the file, else its
    default. The Vault token comes from ``--vault-token-file`` or ``VAULT_TOKEN`` (never
    a command-line value, which other users could read from the process list).

    Raises:
        ConfigError: something is missing or malformed; the message says what to set.
    """
    s = resolve(BROKER_OPTIONS, flags=flags or {}, env=env, file=file or {})
    addr, token, token_file = _vault(s)
    required = {
        "scope_map": "no scope map: pass --scope-map PATH or set CREDBROKER_SCOPE_MAP",
        "audit_log": "no audit log: pass --audit-log PATH or set CREDBROKER_AUDIT_LOG "
                     "(the broker does not run without one)",
        "audit_key": "no checkpoint signing key: pass --audit-key PATH or set "
                     "CREDBROKER_AUDIT_KEY (an Ed25519 PEM key; created if missing)",
    }
    store_url = text_value(s, "store")
    if store_url:  # the audit log lives in the database
        del required["audit_log"]
    for name, message in required.items():
        if not text_value(s, name):
            raise ConfigError(message)
    if store_url:
        from broker.adapters.store_pg import check_url

        check_url(store_url)
    elif not text_value(s, "registry"):
        raise ConfigError("no credential registry: pass --registry PATH (an SQLite file) or set "
                          "CREDBROKER_REGISTRY; or --store postgresql://… (CREDBROKER_STORE) "
                          "for replicas sharing one")
    approvers = _approver_config(
        issuer=text_value(s, "approver_issuer"), jwks=text_value(s, "approver_jwks"),
        audience=text_value(s, "approver_audience"), groups_file=text_value(s, "approver_groups"),
        bots=list(_list(s, "approval_bot")),
        owner_team_cannot_approve=bool(s["owner_team_cannot_approve"].value),
        webhook=text_value(s, "escalation_webhook"))
    fast = _number(s, "approval_fast_seconds")
    if fast <= 0:
        raise ConfigError("--approval-fast-seconds must be a positive number of seconds")
    approvers = replace(approvers, fast_approval_seconds=fast)
    interval = _number(s, "checkpoint_interval")
    if interval <= 0:
        raise ConfigError("--checkpoint-interval must be a positive number of seconds")
    drift = _number(s, "vault_drift_interval")
    if drift < 0:
        raise ConfigError("--vault-drift-interval must be a number of seconds (0 disables)")
    metrics, health = text_value(s, "metrics_listen"), text_value(s, "health_listen")
    default_env, extra_envs = _environments(s, env)
    return BrokerConfig(
        listen=hostport_value(text_value(s, "listen"), "--listen"),
        workload_api_socket=socket_value(text_value(s, "workload_api"), "Workload API socket"),
        scope_map_path=Path(text_value(s, "scope_map")),
        vault_addr=addr,
        vault_token_file=token_file,
        vault_token=token,
        vault_ca_cert=_vault_ca_cert(s),
        jwt_audience=text_value(s, "audience"),
        require_jwt_svid=bool(s["require_jwt_svid"].value),
        ready_file=Path(text_value(s, "ready_file")) if text_value(s, "ready_file") else None,
        audit_path=Path(text_value(s, "audit_log")) if text_value(s, "audit_log") else None,
        registry_path=Path(text_value(s, "registry")),
        store_url=store_url,
        admin_ids=_spiffe_ids(_list(s, "admin_id"), "--admin-id"),
        responder_groups=_list(s, "responder_group") or DEFAULT_RESPONDER_GROUPS,
        automation_ids=_spiffe_ids(_list(s, "automation_id"), "--automation-id"),
        team_scopes=_team_scopes(_list(s, "team_scope")),
        approvers=approvers,
        metrics_listen=hostport_value(metrics, "--metrics-listen") if metrics else "",
        health_listen=hostport_value(health, "--health-listen") if health else "",
        audit_key_path=Path(text_value(s, "audit_key")),
        checkpoint_mirror=(Path(text_value(s, "checkpoint_mirror"))
                           if text_value(s, "checkpoint_mirror") else None),
        checkpoint_interval=interval,
        vault_allowed_mounts=_allowed_mounts(s),
        vault_drift_interval=drift,
        federation=_federation(s),
        default_environment=default_env,
        environments=extra_envs,
    )


def _environments(s: Mapping[str, Setting], env: Mapping[str, str]
                  ) -> tuple[str, tuple[EnvironmentConfig, ...]]:
    """Raises: ConfigError for a malformed entry or a name declared twice."""
    default = check_name(text_value(s, "default_environment") or "default", "--default-environment")
    extra = tuple(parse_environment_flag(t, env) for t in _list(s, "environment"))
    check_environments(default, extra)
    return default, extra


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
