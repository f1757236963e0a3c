"""Every start-up option declared once: its flag, environment variables, config-file key,
default, help and whether it is a secret.

From these declarations come the command-line flags (:func:`add_arguments`), the keys a
``--config`` file may set (:func:`read_config_file`), the reading of the environment and
the precedence (:func:`resolve`: flags > environment > config file > defaults), and the
README's configuration tables (:func:`markdown_table`; a test keeps them equal).
:mod:`broker.config` turns the resolved values into a validated BrokerConfig/SidecarConfig.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from broker.errors import ConfigError

Kind = Literal["text", "number", "switch", "list"]
Value = str | float | bool | tuple[str, ...] | None
DEFAULT_RESPONDER_GROUPS = ("responders",)
#: Where a resolved value came from, weakest first.
SOURCES = ("default", "file", "env", "flag")


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    name: str  # the argparse dest and the config-file key
    flag: str | None  # None: never on the command line (a secret would show in `ps`)
    help: str  # what it is; also the README's "setting" column
    env: tuple[str, ...] = ()  # read in this order; the first that is set wins
    kind: Kind = "text"  # list: a repeatable flag, a comma-separated variable, a YAML list
    default: Value = None
    shown_default: str = ""  # the README's default column when it is not the plain value
    metavar: str | None = None
    secret: bool = False  # never shown: not in reprs, logs or error messages
    in_file: bool = True  # may a --config file set it?

    def default_text(self) -> str:
        if self.shown_default:
            return self.shown_default
        if self.default is None:
            return "—"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, tuple):
            return ", ".join(f"`{d}`" for d in self.default)
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return f"`{self.default}`"


@dataclass(frozen=True, slots=True)
class Setting:
    value: Value
    source: str  # one of SOURCES
    secret: bool = False

    def __repr__(self) -> str:
        shown = "<redacted>" if self.secret else repr(self.value)
        return f"Setting({shown}, from {self.source})"

    @property
    def rank(self) -> int:
        return SOURCES.index(self.source)


def _o(name: str, flag: str | None, help: str, **kw: Any) -> Option:
    return Option(name=name, flag=flag, help=help, **kw)


LISTEN = _o("listen", "--listen", "listen address (host:port; port 0 = any free)",
            env=("CREDBROKER_LISTEN",), default="127.0.0.1:8443")
WORKLOAD_API = _o("workload_api", "--workload-api", "Workload API socket (unix:/path)",
                  env=("SPIFFE_ENDPOINT_SOCKET",))
SCOPE_MAP = _o("scope_map", "--scope-map", "scope map (file or directory of `*.yaml`)",
               env=("CREDBROKER_SCOPE_MAP",))
VAULT_ADDR = _o("vault_addr", "--vault-addr", "Vault/OpenBao address", env=("VAULT_ADDR",))
VAULT_TOKEN_FILE = _o("vault_token_file", "--vault-token-file",
                      "file holding the broker's Vault token, re-read when it changes "
                      "(Vault Agent sink)", shown_default="none")
VAULT_TOKEN = _o("vault_token", None, "the broker's Vault token (never a flag value)",
                 env=("VAULT_TOKEN",), secret=True, in_file=False)
VAULT_CA_CERT = _o("vault_ca_cert", "--vault-ca-cert",
                   "CA certificate (PEM) that Vault's TLS certificate chains to; without it an "
                   "untrusted certificate is refused with an error naming this setting",
                   env=("VAULT_CACERT", "BAO_CACERT"), metavar="PATH",
                   shown_default="the system's trust store")
VAULT_ALLOWED_MOUNT = _o("vault_allowed_mount", "--vault-allowed-mount",
                         "Vault mounts that `vault_policy` paths may reach (never `sys`, "
                         "`auth`, `identity`; also taken by `vault sync` and `scope ...`)",
                         env=("CREDBROKER_VAULT_ALLOWED_MOUNTS",), kind="list",
                         metavar="MOUNT", shown_default="`secret`")
REGISTRY = _o("registry", "--registry", "credential registry, an SQLite file (required "
              "unless --store)", env=("CREDBROKER_REGISTRY",))
STORE = _o("store", "--store", "credential store shared by replicas, PostgreSQL "
           "(`postgresql://user@host:5432/db`; the password in `~/.pgpass` or `PGPASSWORD`, "
           "not the URL, which other users can read in the process list; wins over "
           "`--registry`; see *Replicas*)", env=("CREDBROKER_STORE",), metavar="URL",
           shown_default="none (the SQLite registry)")
ENVIRONMENT = _o("environment", "--environment",
                  "declare an environment besides the default one, with its own Vault/OpenBao "
                  "(the token from `token-file` or the variable `token-env` names, never a "
                  "value here); see *Environments*", env=("CREDBROKER_ENVIRONMENTS",),
                  kind="list",
                  metavar="NAME=URL[,token-file=PATH][,token-env=VAR][,namespace=NS][,ca=PATH]",
                  shown_default="none (one implicit environment, `default`)")
DEFAULT_ENVIRONMENT = _o("default_environment", "--default-environment",
                         "the name of the `--vault-addr` Vault's environment, where requests "
                         "that name none go", env=("CREDBROKER_DEFAULT_ENVIRONMENT",),
                         default="default")
AUDIENCE = _o("audience", "--audience", "JWT-SVID audience", env=("CREDBROKER_AUDIENCE",),
              default="credbroker")

BROKER_OPTIONS: tuple[Option, ...] = (
    LISTEN, WORKLOAD_API, SCOPE_MAP, VAULT_ADDR, VAULT_TOKEN_FILE, VAULT_TOKEN, VAULT_CA_CERT,
    DEFAULT_ENVIRONMENT, ENVIRONMENT, AUDIENCE,
    _o("require_jwt_svid", "--require-jwt-svid", "require a JWT-SVID besides mTLS",
       kind="switch", default=False),
    _o("ready_file", "--ready-file", "write host:port here once serving", in_file=False,
       shown_default="none"),
    _o("audit_log", "--audit-log", "audit log file (required, except with "
       "`--store`: the audit log is then in the database)", env=("CREDBROKER_AUDIT_LOG",)),
    _o("audit_key", "--audit-key", "checkpoint signing key, Ed25519 PEM (required; created "
       "0600 with a `.pub` beside it if missing)", env=("CREDBROKER_AUDIT_KEY",)),
    _o("checkpoint_mirror", "--checkpoint-mirror", "second location for signed checkpoints "
       "(outside the database with `--store`)",
       shown_default="none"),
    _o("checkpoint_interval", "--checkpoint-interval",
       "seconds between checkpoints (`SIGUSR1`: now)", kind="number", default=60.0),
    VAULT_ALLOWED_MOUNT,
    _o("federated_bundle", "--federated-bundle",
       "trust a foreign trust domain (SPIFFE federation) by a static SPIFFE bundle file "
       "(JWK Set), re-read when it changes; see *Federation*", kind="list",
       metavar="TRUST_DOMAIN=PATH", shown_default="none"),
    _o("federation_endpoint", "--federation-endpoint",
       "trust a foreign trust domain by its SPIFFE bundle endpoint, polled per its refresh "
       "hint: `TD=https://…[,profile=https_web|https_spiffe][,spiffe-id=ID][,bundle=PATH]"
       "[,ca=PATH]`; see *Federation*", kind="list", metavar="TRUST_DOMAIN=URL[,…]",
       shown_default="none"),
    _o("vault_drift_interval", "--vault-drift-interval",
       "seconds between checks that Vault still holds exactly the policies and token roles "
       "the broker wrote (0: never)", kind="number", default=30.0),
    _o("approval_fast_seconds", "--approval-fast-seconds",
       "approvals decided faster than this (request to decision) count as possible "
       "rubber-stamping in credbroker_approvals_fast_total",
       env=("CREDBROKER_APPROVAL_FAST_SECONDS",), kind="number", default=30.0),
    REGISTRY,
    STORE,
    _o("admin_id", "--admin-id", "administrators: SPIFFE IDs of the tools that reach the "
       "admin and approvals APIs", env=("CREDBROKER_ADMIN_IDS",), kind="list",
       metavar="SPIFFE_ID", shown_default="none"),
    _o("responder_group", "--responder-group",
       "groups whose people may revoke, freeze, unfreeze", env=("CREDBROKER_RESPONDER_GROUPS",),
       kind="list", metavar="GROUP", default=DEFAULT_RESPONDER_GROUPS),
    _o("automation_id", "--automation-id", "automation that may revoke, freeze, unfreeze with "
       "no person (recorded `automation:<SPIFFE ID>`)", env=("CREDBROKER_AUTOMATION_IDS",),
       kind="list", metavar="SPIFFE_ID", shown_default="none"),
    _o("team_scope", "--team-scope",
       "responders and approvers who act only for some teams: a group (or the SPIFFE ID of "
       "automation or an approval bot) and the teams whose classes, agents and credentials "
       "it may act on; see *Teams*", env=("CREDBROKER_TEAM_SCOPES",), kind="list",
       metavar="WHO=TEAM[+TEAM]", shown_default="none (every team)"),
    _o("approver_issuer", "--approver-issuer", "people's OIDC issuer (approvers and "
       "responders); needs `--approver-jwks`", env=("CREDBROKER_APPROVER_ISSUER",),
       shown_default="none (then only bots approve, and only automation revokes or freezes)"),
    _o("approver_jwks", "--approver-jwks", "that issuer's JWKS (a JSON file)",
       env=("CREDBROKER_APPROVER_JWKS",), shown_default="none"),
    _o("approver_audience", "--approver-audience",
       "ID-token audience (the `credbroker login` client id)", default="credbroker-approvals"),
    _o("approver_groups", "--approver-groups", "extra group membership (YAML approver → groups)",
       shown_default="none"),
    _o("approval_bot", "--approval-bot", "approval bots (approve as themselves)", kind="list",
       metavar="SPIFFE_ID=GROUP[,GROUP]", shown_default="none"),
    _o("owner_team_cannot_approve", "--owner-team-cannot-approve",
       "owner team may not approve its own agents", kind="switch", default=False,
       shown_default="off (allowed)"),
    _o("escalation_webhook", "--escalation-webhook", "escalation webhook (HTTP POST, JSON)",
       env=("CREDBROKER_ESCALATION_WEBHOOK",), shown_default="log only"),
    _o("metrics_listen", "--metrics-listen", "Prometheus `/metrics` address (host:port)",
       shown_default="off"),
    _o("health_listen", "--health-listen", "plaintext gRPC health address (host:port; for "
       "kubelet probes, which cannot do mTLS)", shown_default="off"),
    _o("config", "--config", "a YAML file of these options (underscored names); flags and "
       "environment win over it", in_file=False, shown_default="none"),
)

SIDECAR_OPTIONS: tuple[Option, ...] = (
    _o("listen", "--listen", "agent socket (a unix socket path)",
       env=("CREDBROKER_SIDECAR_SOCKET",)),
    WORKLOAD_API,
    _o("broker", "--broker", "broker `host:port`", env=("CREDBROKER_BROKER_ADDR",)),
    _o("broker_dns_name", "--broker-dns-name", "DNS SAN of the broker's SVID",
       env=("CREDBROKER_BROKER_DNS",), default="broker.credbroker.internal"),
    AUDIENCE,
    _o("no_jwt_svid", "--no-jwt-svid", "send no JWT-SVID, mTLS only", kind="switch",
       default=False, shown_default="off (sends one)"),
    _o("broker_bundle", "--broker-bundle",
       "a sidecar of another trust domain (a vendor's agent): verify the broker with its "
       "trust domain's SPIFFE bundle from this file (JWK Set, or PEM CA certificates), "
       "re-read when it changes; see *Federation*", env=("CREDBROKER_BROKER_BUNDLE",),
       metavar="TRUST_DOMAIN=PATH", shown_default="none (our own trust domain's bundle)"),
    _o("broker_bundle_endpoint", "--broker-bundle-endpoint",
       "the same from the broker's trust domain's SPIFFE bundle endpoint, polled per its "
       "refresh hint (`TD=https://…[,profile=…][,spiffe-id=ID][,bundle=PATH][,ca=PATH]` as "
       "the broker's `--federation-endpoint`; with `--broker-bundle`, that file is the first "
       "bundle)", env=("CREDBROKER_BROKER_BUNDLE_ENDPOINT",),
       metavar="TRUST_DOMAIN=URL[,…]", shown_default="none"),
)

#: What `credbroker vault sync` takes: the broker's own declarations, shared.
VAULT_SYNC_OPTIONS: tuple[Option, ...] = (
    SCOPE_MAP, VAULT_ADDR, VAULT_TOKEN_FILE, VAULT_TOKEN, VAULT_CA_CERT, VAULT_ALLOWED_MOUNT,
    DEFAULT_ENVIRONMENT, ENVIRONMENT,
)


def option(options: Iterable[Option], name: str) -> Option:
    return next(o for o in options if o.name == name)


def _help(o: Option) -> str:
    notes = []
    if o.kind == "list":
        notes.append("repeatable")
    if o.env:
        notes.append(", then ".join(f"${e}" for e in o.env)
                     + (", comma-separated" if o.kind == "list" else ""))
    shown = o.default_text().replace("`", "")
    if o.default not in (None, False) or (o.shown_default and not shown.startswith("none")):
        notes.append(f"default {shown}")
    return o.help.replace("`", "") + (f" ({'; '.join(notes)})" if notes else "")


def add_arguments(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """One flag per option that has one. Absent flags are None: resolve() tells them apart."""
    for o in options:
        if o.flag is None:
            continue
        if o.kind == "switch":
            parser.add_argument(o.flag, dest=o.name, action="store_true", default=None,
                                help=_help(o))
        elif o.kind == "list":
            parser.add_argument(o.flag, dest=o.name, action="append", metavar=o.metavar,
                                help=_help(o))
        else:
            parser.add_argument(o.flag, dest=o.name, metavar=o.metavar, help=_help(o),
                                type=float if o.kind == "number" else str)


def flag_values(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, object]:
    return {o.name: getattr(args, o.name, None) for o in options if o.flag is not None}


def file_keys(options: Iterable[Option]) -> tuple[str, ...]:
    return tuple(o.name for o in options if o.in_file)


def read_config_file(path: str | None, options: Sequence[Option]) -> dict[str, object]:
    """The ``--config`` YAML file as option: value; empty when no file is named.

    Raises:
        ConfigError: the file is unreadable, not a mapping, or names unknown keys.
    """
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read --config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a YAML mapping of option: value")
    known = file_keys(options)
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(known)}")
    return {str(k): v for k, v in data.items()}


def _where(o: Option, source: str) -> str:
    if source == "env":
        return "$" + "/$".join(o.env)
    if source == "file":
        return f"config key {o.name}"
    return o.flag or o.name


def _convert(o: Option, raw: object, source: str) -> Value:
    """Raises: ConfigError naming where the value came from (never the value of a secret)."""
    if o.kind == "list":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{_where(o, source)} must be a list")
        return tuple(s for s in (str(i).strip() for i in items) if s)
    if o.kind == "number":
        try:
            return float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{_where(o, source)} must be a number of seconds, not "
                              f"{raw!r}") from None
    if o.kind == "switch":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on",
                                                             "0", "false", "no", "off", ""):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{_where(o, source)} must be true or false")
    if isinstance(raw, dict | list):
        what = "<secret>" if o.secret else repr(raw)
        raise ConfigError(f"{_where(o, source)} must be a single value, not {what}")
    return str(raw)


def _given(value: object) -> bool:
    return value is not None and value != "" and value != [] and value != ()


def resolve(options: Iterable[Option], *, flags: Mapping[str, object],
            env: Mapping[str, str], file: Mapping[str, object]) -> dict[str, Setting]:
    """Each option's value and where it came from: flags > environment > config file >
    defaults. An empty environment variable counts as unset.

    Raises:
        ConfigError: a value cannot be read as its option's kind.
    """
    out: dict[str, Setting] = {}
    for o in options:
        if _given(flags.get(o.name)):
            out[o.name] = Setting(_convert(o, flags[o.name], "flag"), "flag", o.secret)
            continue
        env_value = next((env[e] for e in o.env if env.get(e, "").strip()), None)
        if env_value is not None:
            out[o.name] = Setting(_convert(o, env_value, "env"), "env", o.secret)
        elif o.in_file and _given(file.get(o.name)):
            out[o.name] = Setting(_convert(o, file[o.name], "file"), "file", o.secret)
        else:
            out[o.name] = Setting(o.default, "default", o.secret)
    return out


def markdown_table(options: Iterable[Option], heading: str) -> str:
    """The README's table of ``options`` (a test keeps the README equal to it)."""
    rows = [f"| {heading} | flag | environment | default |", "|---|---|---|---|"]
    for o in options:
        flag = f"`{o.flag}`" + (" (repeatable)" if o.kind == "list" else "") if o.flag else ""
        env = ", then ".join(f"`{e}`" for e in o.env)
        if env and o.kind == "list":
            env += " (comma-separated)"
        rows.append(f"| {o.help} | {flag} | {env} | {o.default_text()} |")
    return "\n".join(rows) + "\n"


#: Defaults other modules name (the broker's DNS SAN, the JWT-SVID audience).
DEFAULT_AUDIENCE = str(AUDIENCE.default)
DEFAULT_BROKER_DNS = str(option(SIDECAR_OPTIONS, "broker_dns_name").default)


def socket_value(value: str, what: str) -> str:
    if not value:
        raise ConfigError(
            f"{what} is not set: pass --workload-api unix:/path or set SPIFFE_ENDPOINT_SOCKET"
        )
    path = value.removeprefix("unix:")
    if not path.startswith("/"):
        raise ConfigError(f"{what} {value!r} must be an absolute unix socket path (unix:/path)")
    return "unix:" + path


def hostport_value(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {value!r} must be host:port, e.g. 127.0.0.1:8443")
    return value


def text_value(s: Mapping[str, Setting], name: str) -> str:
    return str(s[name].value or "")
