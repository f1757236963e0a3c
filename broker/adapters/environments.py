"""Environments: production, sandbox, ... each with its own Vault/OpenBao.

The broker's ``--vault-addr`` Vault is the *default* environment (named by
``--default-environment``, ``default`` unless said otherwise); each ``--environment
NAME=URL[,token-file=PATH][,token-env=VAR][,namespace=NS][,ca=PATH]`` adds one more.
A broker that declares none has exactly one implicit environment, ``default``, and
behaves as before environments existed (requests, registry rows and audit records carry
no environment name).

A request names its environment (``environment``); one that names none goes to the
default environment. A credential is minted in its environment's Vault and is revoked,
looked up and frozen there: a token of one Vault means nothing to another.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.adapters.vault import SyncReport, VaultAdapter
from broker.core.scopemap import ScopeMap
from broker.errors import (
    ConfigError,
    UnknownEnvironmentError,
    VaultError,
    VaultPermissionError,
    VaultUnavailableError,
)

#: The one environment of a broker that declares none.
IMPLICIT = "default"
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
FLAG = "--environment"
ENTRY_FORM = "NAME=URL[,token-file=PATH][,token-env=VAR][,namespace=NS][,ca=PATH]"
#: Separates an environment name from a Vault entity id in the ids a freeze records.
ENTITY_SEP = "#"


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvironmentConfig:
    """One declared environment other than the default one (``--environment``)."""

    name: str
    addr: str
    token: str  # secret: never log it (repr hides it)
    token_file: Path | None = None
    namespace: str = ""
    ca_cert: Path | None = None

    def __repr__(self) -> str:
        return f"EnvironmentConfig(name={self.name!r}, addr={self.addr!r}, token=<redacted>)"


def check_name(name: str, where: str) -> str:
    """Raises: ConfigError when ``name`` is not an environment name."""
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: environment name {name!r} must be lower-case letters, "
                          "digits, '_' or '-', starting with a letter (e.g. production)")
    return name


def parse_environment_flag(text: str, env: Mapping[str, str]) -> EnvironmentConfig:
    """One ``--environment`` entry. The token is read from ``token-file`` or from the
    environment variable ``token-env`` names (never a value on the command line).

    Raises:
        ConfigError: malformed, an unknown key, not a URL, no token, an unreadable file.
    """
    head, *rest = text.split(",")
    name, sep, url = head.partition("=")
    if not sep or not name or not url:
        raise ConfigError(f"{FLAG} {text!r}: expected {ENTRY_FORM}")
    check_name(name, FLAG)
    opts: dict[str, str] = {}
    for item in rest:
        k, s, v = item.partition("=")
        if not s or k not in ("token-file", "token-env", "namespace", "ca") or not v:
            raise ConfigError(f"{FLAG} {name}: unknown or empty setting {k!r} (token-file, "
                              "token-env, namespace, ca)")
        opts[k] = v
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{FLAG} {name}: the Vault address {url!r} must be an http(s) URL, "
                          "e.g. https://vault-sandbox.example:8200")
    token, token_file = "", None
    if "token-file" in opts:
        token_file = Path(opts["token-file"])
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{FLAG} {name}: cannot read token-file {token_file}: "
                              f"{exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{FLAG} {name}: token-file {token_file} is not a text file (a "
                              "Vault token is text): write the token alone into it") from None
    elif "token-env" in opts:
        token = env.get(opts["token-env"], "").strip()
        if not token:
            raise ConfigError(f"{FLAG} {name}: the environment variable {opts['token-env']} "
                              "named by token-env is not set")
    if not token:
        raise ConfigError(f"{FLAG} {name}: no Vault token: add token-file=PATH (a Vault Agent "
                          "sink) or token-env=VARIABLE")
    ca = None
    if "ca" in opts:
        ca = Path(opts["ca"])
        try:
            head_bytes = ca.read_bytes()[:4096]
        except OSError as exc:
            raise ConfigError(f"{FLAG} {name}: cannot read ca {ca}: {exc.strerror}") from None
        if b"-----BEGIN CERTIFICATE-----" not in head_bytes:
            raise ConfigError(f"{FLAG} {name}: ca {ca} is not a PEM certificate")
    return EnvironmentConfig(name=name, addr=url.rstrip("/"), token=token,
                             token_file=token_file, namespace=opts.get("namespace", ""),
                             ca_cert=ca)


def check_environments(default: str, extra: tuple[EnvironmentConfig, ...]) -> None:
    """Raises: ConfigError when a name is declared twice."""
    seen = [default]
    for e in extra:
        if e.name in seen:
            raise ConfigError(f"{FLAG} {e.name}: environment {e.name!r} is declared twice "
                              f"(the default environment is {default!r}, the --vault-addr "
                              "Vault)")
        seen.append(e.name)


class Environments:
    """Every environment's Vault adapter, by name; the default one first."""

    def __init__(self, adapters: Mapping[str, VaultAdapter], *, default: str,
                 declared: bool) -> None:
        assert default in adapters
        self._adapters = dict(adapters)
        self.default = default
        #: False: the broker declares none (one implicit environment; no names recorded).
        self.declared = declared

    @classmethod
    def single(cls, vault: VaultAdapter) -> Environments:
        """The one implicit environment of a broker that declares none."""
        return cls({IMPLICIT: vault}, default=IMPLICIT, declared=False)

    @classmethod
    def build(cls, vault: VaultAdapter, *, default: str,
              extra: tuple[EnvironmentConfig, ...]) -> Environments:
        """``vault`` (``--vault-addr``) as the default environment ``default``, then one
        adapter per ``--environment``; just ``vault`` when none is declared (no extra and
        the default keeps its implicit name)."""
        if not extra and default == IMPLICIT:
            return cls.single(vault)
        adapters = {default: vault}
        for e in extra:
            adapters[e.name] = VaultAdapter(addr=e.addr, token=e.token, token_file=e.token_file,
                                            ca_cert=e.ca_cert, namespace=e.namespace)
        return cls(adapters, default=default, declared=True)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def __iter__(self) -> Iterator[tuple[str, VaultAdapter]]:
        return iter(self._adapters.items())

    def resolve(self, name: str) -> str:
        """The environment a request naming ``name`` is for, as recorded: the default
        environment's name when it names none; "" when the broker declares none.

        Raises:
            UnknownEnvironmentError: the broker declares no environment of that name.
        """
        if not name:
            return self.default if self.declared else ""
        if name not in self._adapters:
            raise UnknownEnvironmentError(
                f"environment {name!r} is not one this broker declares (known: "
                f"{', '.join(self._adapters)}); name one of them, or none for "
                f"{self.default!r}")
        return name if self.declared else ""

    def vault(self, name: str) -> VaultAdapter:
        """The Vault of environment ``name`` ("" and names of a broker that declares none:
        the default one).

        Raises:
            UnknownEnvironmentError: no such environment (a registry row written under
                another configuration).
        """
        if not name or not self.declared:
            return self._adapters[self.default]
        try:
            return self._adapters[name]
        except KeyError:
            raise UnknownEnvironmentError(
                f"environment {name!r} is not declared in this broker's configuration "
                f"(known: {', '.join(self._adapters)}); declare it again with --environment "
                "to reach its credentials") from None

    def label(self, name: str) -> str:
        """How a health check or log line names environment ``name``'s Vault."""
        return f"Vault ({name})" if self.declared else "Vault"

    def check_scope_map(self, scope_map: ScopeMap) -> None:
        """Raises: ConfigError when the map declares an environment the broker does not."""
        unknown = [e for e in scope_map.environments if e not in self._adapters]
        if unknown:
            raise ConfigError(
                f"the scope map declares environment(s) {', '.join(unknown)} that this broker "
                f"does not (it knows {', '.join(self._adapters)}): declare each with "
                f"{FLAG} {ENTRY_FORM} (and --default-environment for the --vault-addr one)")

    def sync_scope_map(self, scope_map: ScopeMap, frozen_classes: frozenset[str] = frozenset(),
                       *, keep_frozen: bool = False) -> SyncReport:
        """Bring every environment's Vault in line with the classes allowed there
        (:meth:`VaultAdapter.sync_scope_map`); a class an environment no longer allows has
        its policy there emptied. The report's names carry ``<environment>:`` when the
        broker declares environments.

        Raises:
            VaultUnavailableError, VaultError: naming the environment that failed.
        """
        if not self.declared:
            return self._adapters[self.default].sync_scope_map(
                scope_map, frozen_classes, keep_frozen=keep_frozen)
        policies: list[str] = []
        roles: list[str] = []
        unchanged: list[str] = []
        kept: list[str] = []
        for env, vault in self._adapters.items():
            mine = self.scope_map_for(scope_map, env)
            try:
                r = vault.sync_scope_map(mine, frozen_classes, keep_frozen=keep_frozen)
                emptied = vault.empty_policies(c.vault_policy_name
                                               for n, c in scope_map.classes.items()
                                               if n not in mine.classes)
            except VaultError as exc:
                raise in_environment(env, exc) from None
            policies += [f"{env}:{n}" for n in (*r.policies_written, *emptied)]
            roles += [f"{env}:{n}" for n in r.roles_written]
            unchanged += [f"{env}:{n}" for n in r.unchanged]
            kept += [c for c in r.kept_frozen if c not in kept]
        return SyncReport(policies_written=tuple(policies), roles_written=tuple(roles),
                          unchanged=tuple(unchanged), kept_frozen=tuple(kept))

    def scope_map_for(self, scope_map: ScopeMap, name: str) -> ScopeMap:
        """What environment ``name``'s Vault holds of ``scope_map``: the classes allowed
        there (all of them on a broker that declares no environments)."""
        return scope_map.in_environment(name) if self.declared else scope_map


def in_environment(env: str, exc: VaultError) -> VaultError:
    """``exc`` again, its message led by the environment whose Vault it came from."""
    for kind in (VaultPermissionError, VaultUnavailableError, VaultError):
        if isinstance(exc, kind):
            return kind(f"environment {env!r}: {exc}")
    return exc  # pragma: no cover - every VaultError is one of the above


def tag_entity(environment: str, entity_id: str) -> str:
    """An entity id as a freeze records it: with its environment when it has one."""
    return f"{environment}{ENTITY_SEP}{entity_id}" if environment else entity_id


def split_entity(tagged: str) -> tuple[str, str]:
    """(environment, entity id) of a recorded entity id ("" environment: the default)."""
    env, sep, eid = tagged.rpartition(ENTITY_SEP)
    return (env, eid) if sep else ("", tagged)
