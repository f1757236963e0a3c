"""The one typed adapter around hvac (which is untyped). Maps Vault errors to ours.

Credentials are minted as Vault token-role tokens bound to the workload's own
Vault identity entity: ``auth/token/create/credbroker-<class>`` with
``entity_alias=<SPIFFE ID>``. Vault creates (once) an entity alias named by the
SPIFFE ID on the token auth mount, so every credential of one workload belongs
to one entity; disabling that entity makes all of them refused at once and
blocks new ones (measured: bench/bench_freeze.py, README "Benchmarks"). Token roles also give
what the JWT-login alternative cannot: truly non-renewable tokens
(``renewable=false``) and metadata set directly at creation, with no second
signing key for Vault to trust.

Each identity mints through its own token role per class,
``credbroker-<class>--<hash of the SPIFFE ID>`` (the class role's settings plus a
``path_suffix``), created on its first mint and kept in line with the class by
:meth:`VaultAdapter.sync_scope_map`. Vault records every token's lease path as
``auth/token/create/<role>/<suffix>``, so one ``sys/leases/revoke-prefix`` call per
class ends every token of one identity (:meth:`VaultAdapter.revoke_prefix`) at
Vault's own speed; the entity disable stays the instant refusal.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from broker.core.models import MintedToken
from broker.core.scopemap import ActionClass, ScopeMap
from broker.core.spiffeid import SpiffeId
from broker.errors import (
    CredbrokerError,
    VaultError,
    VaultNamespaceError,
    VaultPermissionError,
    VaultUnavailableError,
)

_log = logging.getLogger(__name__)

#: Metadata key set on every token the broker mints (used to find them again).
MANAGED_META_KEY = "credbroker"
#: A frozen class's policy: grants nothing. Vault evaluates policies per request,
#: so every live token of the class loses its power the moment this is written.
FROZEN_POLICY = ('# managed by credbroker: this action class is FROZEN\n'
                 'path "sys/credbroker-frozen" {\n  capabilities = ["deny"]\n}\n')


#: Seconds to wait for ``sys/leases/revoke-prefix`` (it returns when every lease is gone).
REVOKE_PREFIX_TIMEOUT = 300.0
#: Joins a class's role name and an identity's hash (class names never contain '-').
IDENTITY_ROLE_SEP = "--"


def identity_hash(spiffe_id: str) -> str:
    """16 hex digits naming one SPIFFE ID in Vault paths (role names, lease paths)."""
    return hashlib.sha256(spiffe_id.encode()).hexdigest()[:16]


def identity_role_name(cls: ActionClass, spiffe_id: str) -> str:
    """The token role ``spiffe_id`` mints ``cls`` through."""
    return f"{cls.vault_policy_name}{IDENTITY_ROLE_SEP}{identity_hash(spiffe_id)}"


def lease_prefix(cls: ActionClass, spiffe_id: str) -> str:
    """The lease path prefix every token ``spiffe_id`` holds of ``cls`` lies under (and
    nothing else does: it ends in the role's ``path_suffix`` and '/')."""
    return f"auth/token/create/{identity_role_name(cls, spiffe_id)}/"


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenInfo:
    accessor: str
    policies: tuple[str, ...]
    metadata: Mapping[str, str]
    ttl_seconds: int
    renewable: bool
    entity_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    policies_written: tuple[str, ...]
    roles_written: tuple[str, ...]
    unchanged: tuple[str, ...]
    kept_frozen: tuple[str, ...] = ()  # frozen in Vault, not in frozen_classes (keep_frozen)


#: What the broker's own token must be able to do: (path, capabilities, what for). The
#: ``credbroker-probe`` names stand for any managed policy, role or entity.
REQUIRED_CAPABILITIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("sys/policies/acl/credbroker-probe", ("create", "read", "update"), "writing class policies"),
    ("auth/token/roles/credbroker-probe", ("create", "read", "update"), "writing token roles"),
    ("auth/token/roles/credbroker-probe--0", ("create", "update", "delete"),
     "writing and removing each identity's token roles"),
    ("auth/token/roles", ("list",), "finding each identity's token roles"),
    ("auth/token/create/credbroker-probe", ("update",), "minting"),
    ("sys/leases/revoke-prefix/auth/token/create/credbroker-probe--0/",
     ("update", "sudo"), "revoking all of one identity's credentials at once"),
    ("auth/token/lookup-accessor", ("update",), "looking credentials up"),
    ("auth/token/revoke-accessor", ("update",), "revoking"),
    ("auth/token/accessors", ("list", "sudo"), "finding tokens of unfinished mints"),
    ("identity/entity/id/probe", ("update",), "freezing identities"),
    ("identity/lookup/entity", ("update",), "finding a workload's entity"),
    ("sys/auth", ("read",), "finding the token auth mount"),
)


class _NamespaceNotFound(hvac.exceptions.VaultError):  # type: ignore[misc]
    """OpenBao/Vault's 404 "namespace not found": the request's namespace does not exist."""


class _Adapter(hvac.adapters.JSONAdapter):  # type: ignore[misc]
    """hvac's JSON adapter, except that a 404 for a namespace that does not exist is not an
    ``InvalidPath``: hvac and this module read ``InvalidPath`` as "no such token, policy,
    role or entity", and a misspelt namespace must never pass for that."""

    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        if response.status_code == 404:
            try:
                errors = response.json().get("errors") or []
            except (ValueError, AttributeError):
                errors = []
            if "namespace not found" in errors:
                raise _NamespaceNotFound(f"namespace not found, on {method} {url}")
        super()._raise_for_error(method, url, response)


class VaultAdapter:
    """Everything the broker asks of Vault/OpenBao."""

    def __init__(self, *, addr: str, token: str, timeout: float = 5.0,
                 token_file: Path | None = None, ca_cert: Path | None = None,
                 namespace: str = "") -> None:
        """``ca_cert``: the PEM CA bundle Vault's TLS certificate must chain to (None: the
        system's trust store). ``namespace``: the Vault/OpenBao namespace every call goes to
        ("": the root); policies, token roles, entities and tokens are that namespace's."""
        self.addr = addr
        self.ca_cert = ca_cert
        self.namespace = namespace
        #: How messages name this Vault: its address, and its namespace if it has one.
        self._at = f"{addr} (namespace {namespace})" if namespace else addr
        verify = str(ca_cert) if ca_cert is not None else True
        self._client = hvac.Client(url=addr, token=token, timeout=timeout, verify=verify,
                                   namespace=namespace or None, adapter=_Adapter)
        #: ``sys/health`` answers only at the root (in a namespace: 400 "operation
        #: unavailable in namespaces"), and needs no token.
        self._root = self._client if not namespace else hvac.Client(
            url=addr, token="", timeout=timeout, verify=verify)
        self._token_file = token_file
        self._token_stamp: tuple[int, int] | None = None
        #: True once :meth:`check_capabilities` found the token able to do everything.
        self._capabilities_ok = False
        #: Identity token roles this process wrote, with the body written (a mint skips
        #: writing them again; a sync that changes a class forgets its entries).
        self._identity_roles: dict[str, dict[str, Any]] = {}
        self._roles_lock = threading.Lock()

    def _fresh_token(self) -> None:
        """Follow a token file that a Vault Agent sink rewrites (checked by mtime). Never
        raises: a file that cannot be read, or is not text, leaves the token in use."""
        if self._token_file is None:
            return
        try:
            st = self._token_file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._token_stamp:
                token = self._token_file.read_text(encoding="utf-8").strip()
                if token:
                    self._client.token = token
                else:
                    _log.warning("the Vault token file %s is empty; the token in use stays",
                                 self._token_file)
                self._token_stamp = stamp
        except OSError as exc:
            _log.warning("cannot re-read the Vault token file %s: %s", self._token_file,
                         exc.strerror)
        except UnicodeDecodeError:
            # Not a token (a sink that wrote something else): the token in use stays, and
            # this version of the file is not read again.
            self._token_stamp = stamp
            _log.warning("the Vault token file %s is not text (not UTF-8): the token read "
                         "before stays in use; check what writes that file (a Vault Agent "
                         "sink writes the token as text)", self._token_file)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate hvac/requests failures into our errors, naming Vault and the operation."""
        self._fresh_token()
        try:
            yield
        except requests.exceptions.SSLError as exc:
            trust = (f"the CA certificate {self.ca_cert}" if self.ca_cert is not None
                     else "the system's trust store")
            raise VaultUnavailableError(
                f"Vault at {self._at}: TLS failed while trying to {what}: its certificate is "
                f"not trusted by {trust} ({_tls_reason(exc)}); pass --vault-ca-cert PATH or "
                "set VAULT_CACERT to the CA that signed Vault's certificate"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise VaultUnavailableError(
                f"Vault at {self._at} is unreachable while trying to {what} "
                f"({type(exc).__name__}); check that Vault/OpenBao is running and reachable"
            ) from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError,
                hvac.exceptions.BadGateway) as exc:
            raise VaultUnavailableError(
                f"Vault at {self._at} is not serving ({_first_line(exc)}) while trying to {what}; "
                "it may be sealed or restarting"
            ) from None
        except _NamespaceNotFound:
            raise VaultNamespaceError(
                f"Vault at {self.addr}: namespace {self.namespace!r} does not exist (OpenBao/"
                f"Vault answers 'namespace not found' while the broker tries to {what}); "
                f"create it (bao/vault namespace create {self.namespace}) or correct namespace= in "
                "this environment's --environment entry"
            ) from None
        except hvac.exceptions.Forbidden:
            raise VaultPermissionError(
                f"Vault at {self._at} refused the broker permission to {what}: the broker's "
                "own Vault token is revoked, expired or lacks a capability (operator: give the "
                "broker a valid token with the policy in the README, Security model)"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise VaultError(f"Vault at {self._at} failed to {what}: {_first_line(exc)}") from None
        except CredbrokerError:
            raise
        except requests.RequestException as exc:
            # e.g. an answer cut off mid-body (ChunkedEncodingError): Vault may have acted.
            raise VaultUnavailableError(
                f"Vault's answer at {self._at} was lost while trying to {what} "
                f"({type(exc).__name__}); check the network path to Vault/OpenBao"
            ) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A 200 that is not Vault's JSON (a proxy's page, a truncated body): what Vault
            # did is unknown, so it is handled like a lost answer.
            raise VaultUnavailableError(
                f"Vault at {self._at} gave an answer the broker cannot read while trying to "
                f"{what} ({type(exc).__name__}); is something other than Vault answering?"
            ) from None

    def check_capabilities(self) -> list[str]:
        """What the broker's own token cannot do of what the broker needs (empty: all good).

        Asks Vault itself (``sys/capabilities-self``), so a token that is revoked or
        expired is reported as such. Once this has returned no problem, a 403 for one
        accessor's look-up means that token does not exist (OpenBao answers 403, not
        404, for accessors of mints that never completed), not a lack of capability.

        Raises:
            VaultUnavailableError: Vault could not be asked.
        """
        paths = {path: caps for path, caps, _ in REQUIRED_CAPABILITIES}
        try:
            with self._errors("check its own capabilities"):
                resp = self._client.write("sys/capabilities-self", paths=list(paths))
        except VaultNamespaceError as exc:
            self._capabilities_ok = False
            return [str(exc)]
        except VaultPermissionError:
            self._capabilities_ok = False
            return [f"Vault at {self._at} refuses the broker's token itself (it is revoked or "
                    "expired, or lacks sys/capabilities-self): give the broker a valid token"]
        data = (resp or {}).get("data", resp or {})
        missing = []
        for path, need, why in REQUIRED_CAPABILITIES:
            have = set(data.get(path) or [])
            if "root" in have:
                continue
            lacking = [c for c in need if c not in have]
            if lacking:
                missing.append(f"{','.join(lacking)} on {path} ({why})")
        self._capabilities_ok = not missing
        return [f"the broker's Vault token lacks {m}" for m in missing]

    def _forbidden_means_gone(self) -> bool:
        """After a 403 for one accessor: is the broker's own token fine (then the accessor's
        token does not exist)? Asks Vault again rather than trust an earlier answer."""
        if not self._capabilities_ok:
            return False
        try:
            return not self.check_capabilities()
        except CredbrokerError:
            return False

    def health(self) -> None:
        """Asks ``sys/health`` at the root (the only place it answers), then, for a
        namespace, whether the namespace exists.

        Raises:
            VaultUnavailableError: Vault is unreachable, sealed or uninitialised.
            VaultNamespaceError: the namespace does not exist.
        """
        with self._errors("check its health"):
            status = self._root.sys.read_health_status(method="GET")
            if isinstance(status, requests.Response):
                # hvac hands back any answer but a 200 as it came (503 sealed, 501 not
                # initialised, 429 standby): its body is the same JSON status.
                status = status.json()
            if status.get("sealed"):
                raise VaultUnavailableError(f"Vault at {self._at} is sealed")
            if status.get("initialized") is False:
                raise VaultUnavailableError(f"Vault at {self._at} is not initialised")
            if self.namespace:
                try:
                    self._client.auth.token.lookup_self()
                except hvac.exceptions.Forbidden:
                    pass  # the namespace exists; the token check says what the token lacks

    # -- scope map → Vault

    def sync_scope_map(self, scope_map: ScopeMap,
                       frozen_classes: frozenset[str] = frozenset(), *,
                       keep_frozen: bool = False) -> SyncReport:
        """Write each class's policy and token role, idempotently.

        Only what differs is written, so live tokens of unchanged classes are
        untouched. With ``keep_frozen``, a policy that Vault holds frozen stays
        frozen even for a class not in ``frozen_classes`` (another replica froze
        it, or a registry that is gone did): only an unfreeze lifts a freeze.

        Raises:
            VaultUnavailableError, VaultError.
        """
        written_p: list[str] = []
        written_r: list[str] = []
        unchanged: list[str] = []
        kept: list[str] = []
        for cls in scope_map.classes.values():
            name = cls.vault_policy_name
            hcl = FROZEN_POLICY if cls.name in frozen_classes else cls.vault_policy_hcl()
            with self._errors(f"read policy {name}"):
                try:
                    current = self._client.sys.read_policy(name)["data"]["rules"]
                except hvac.exceptions.InvalidPath:
                    current = None
            if keep_frozen and current == FROZEN_POLICY and hcl != FROZEN_POLICY:
                hcl = FROZEN_POLICY
                kept.append(cls.name)
            if current != hcl:
                with self._errors(f"write policy {name}"):
                    self._client.sys.create_or_update_policy(name, hcl)
                written_p.append(name)
            role = self._role_body(cls)
            with self._errors(f"read token role {name}"):
                resp = self._client.read(f"auth/token/roles/{name}")
            if resp is None or not _role_matches(resp["data"], role):
                with self._errors(f"write token role {name}"):
                    self._client.write(f"auth/token/roles/{name}", **role)
                written_r.append(name)
            if current == hcl and resp is not None and name not in written_r:
                unchanged.append(name)
        written_r += self._sync_identity_roles(scope_map, changed={
            n for n in written_r})
        return SyncReport(policies_written=tuple(written_p), roles_written=tuple(written_r),
                          unchanged=tuple(unchanged), kept_frozen=tuple(kept))

    def _sync_identity_roles(self, scope_map: ScopeMap, changed: set[str]) -> list[str]:
        """Bring the identity token roles in line: those of a class whose role was just
        (re)written get its new settings; those of a class no longer in the map are deleted
        (their live tokens were made powerless by the emptied policy). Returns the roles
        written or deleted.

        Raises:
            VaultUnavailableError, VaultError.
        """
        with self._errors("list token roles"):
            resp = self._client.list("auth/token/roles")
        names = [str(k) for k in ((resp or {}).get("data") or {}).get("keys") or []]
        by_policy = {c.vault_policy_name: c for c in scope_map.classes.values()}
        out: list[str] = []
        for role in names:
            base, sep, suffix = role.partition(IDENTITY_ROLE_SEP)
            if not sep or not base.startswith("credbroker-") or not suffix:
                continue
            cls = by_policy.get(base)
            if cls is None:
                with self._errors(f"delete token role {role}"):
                    self._client.delete(f"auth/token/roles/{role}")
                with self._roles_lock:
                    self._identity_roles.pop(role, None)
                out.append(role)
            elif base in changed:
                body = {**self._role_body(cls), "path_suffix": suffix}
                with self._errors(f"write token role {role}"):
                    self._client.write(f"auth/token/roles/{role}", **body)
                with self._roles_lock:
                    self._identity_roles[role] = body
                out.append(role)
            else:  # written under the same class role: a restarted broker mints in one call
                with self._roles_lock:
                    self._identity_roles.setdefault(
                        role, {**self._role_body(cls), "path_suffix": suffix})
        with self._roles_lock:  # roles of changed classes not listed: written at next mint
            for role in [r for r in self._identity_roles
                         if r.partition(IDENTITY_ROLE_SEP)[0] in changed and r not in out]:
                del self._identity_roles[role]
        return out

    def _ensure_identity_role(self, cls: ActionClass, spiffe_id: str) -> str:
        """Write ``spiffe_id``'s token role for ``cls`` unless this process already did.

        Raises:
            VaultUnavailableError, VaultError.
        """
        role = identity_role_name(cls, spiffe_id)
        body = {**self._role_body(cls), "path_suffix": identity_hash(spiffe_id)}
        with self._roles_lock:
            if self._identity_roles.get(role) == body:
                return role
        with self._errors(f"write token role {role}"):
            self._client.write(f"auth/token/roles/{role}", **body)
        with self._roles_lock:
            self._identity_roles[role] = body
        return role

    @contextmanager
    def _forget_role_on_error(self, role: str) -> Iterator[None]:
        """A failed mint writes the identity's role again next time (it may be gone)."""
        try:
            yield
        except Exception:
            with self._roles_lock:
                self._identity_roles.pop(role, None)
            raise

    def revoke_prefix(self, prefix: str) -> None:
        """Revoke every lease (token) under ``prefix`` in one call; returns once Vault has.

        Raises:
            VaultUnavailableError, VaultError.
        """
        with self._errors("revoke an identity's credentials by prefix"):
            # Vault answers once all are revoked: thousands of tokens take seconds, far
            # longer than any other call, so this one waits longer than the usual timeout.
            self._client.adapter.put(f"/v1/sys/leases/revoke-prefix/{prefix}",
                                     timeout=REVOKE_PREFIX_TIMEOUT)

    @staticmethod
    def _role_body(cls: ActionClass) -> dict[str, Any]:
        domains = sorted({p.trust_domain for p in cls.workloads})
        return {
            "allowed_policies": [cls.vault_policy_name],
            "disallowed_policies": ["root"],
            "orphan": True,
            "renewable": False,
            "token_explicit_max_ttl": cls.max_ttl_seconds,
            "token_no_default_policy": True,
            "token_type": "service",
            "allowed_entity_aliases": [f"spiffe://{td}/*" for td in domains],
            # Written (and so compared by the drift check) although they are the defaults:
            # a role widened behind the broker's back (any policy by glob, periodic tokens
            # that never expire) is drift to put back.
            "allowed_policies_glob": [],
            "token_period": 0,
        }

    # -- credentials

    def mint(
        self,
        *,
        cls: ActionClass,
        spiffe_id: SpiffeId,
        ttl_seconds: int,
        metadata: Mapping[str, str],
        now: datetime,
    ) -> MintedToken:
        """Mint a non-renewable token for ``cls``, bound to ``spiffe_id``'s Vault entity.

        Raises:
            VaultUnavailableError: Vault could not be reached.
            VaultError: Vault refused (e.g. the role is missing: run ``credbroker vault sync``).
        """
        meta = {MANAGED_META_KEY: "1", "spiffe_id": str(spiffe_id), "action_class": cls.name,
                **metadata}
        role = self._ensure_identity_role(cls, str(spiffe_id))

        def create() -> Any:
            return self._client.write(
                f"auth/token/create/{role}",
                policies=[cls.vault_policy_name],
                ttl=f"{ttl_seconds}s",
                explicit_max_ttl=f"{ttl_seconds}s",
                renewable=False,
                no_default_policy=True,
                entity_alias=str(spiffe_id),
                display_name=cls.name,
                meta=meta,
            )

        with self._errors(f"mint a {cls.name} credential"), self._forget_role_on_error(role):
            try:
                resp = create()
            except hvac.exceptions.InvalidRequest as exc:
                if "unknown role" not in str(exc):
                    raise
                # The identity's role was deleted under this process (an operator, or a
                # broker with another map): Vault minted nothing; write it again, once.
                with self._roles_lock:
                    self._identity_roles.pop(role, None)
                self._ensure_identity_role(cls, str(spiffe_id))
                resp = create()
            auth = resp["auth"]
            return MintedToken(
                token=auth["client_token"],
                accessor=auth["accessor"],
                policies=tuple(auth["token_policies"]),
                ttl_seconds=int(auth["lease_duration"]),
                expires_at=now + timedelta(seconds=int(auth["lease_duration"])),
                entity_id=auth.get("entity_id") or "",
                lease_prefix=lease_prefix(cls, str(spiffe_id)),
            )

    def lookup_accessor(self, accessor: str) -> TokenInfo | None:
        """The live token behind ``accessor``, or None when it is expired, revoked or unknown.

        Raises:
            VaultUnavailableError, VaultError.
        """
        with self._errors("look up a credential"):
            try:
                data = self._client.auth.token.lookup_accessor(accessor)["data"]
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
                return None  # Vault answers 400 "invalid accessor" for dead tokens
            except hvac.exceptions.Forbidden:
                # OpenBao answers 403 for an accessor whose token never came to exist (a
                # mint interrupted by a crash). Only when our own token is good right now
                # may that be read as "not live" (a revoked broker token gets 403 too).
                if self._forbidden_means_gone():
                    return None
                raise
            return TokenInfo(
                accessor=data["accessor"],
                policies=tuple(data.get("policies") or ()),
                metadata=dict(data.get("meta") or {}),
                ttl_seconds=int(data.get("ttl") or 0),
                renewable=bool(data.get("renewable")),
                entity_id=data.get("entity_id") or "",
            )

    # -- kill switches

    def set_entity_disabled(self, entity_id: str, disabled: bool) -> None:
        """Disable (or enable) a workload's Vault entity: all its tokens refused (or usable).

        Raises:
            VaultUnavailableError, VaultError.
        """
        with self._errors(("disable" if disabled else "re-enable") + " a workload's entity"):
            self._client.write(f"identity/entity/id/{entity_id}", disabled=disabled)

    def entity_of(self, spiffe_id: str) -> str | None:
        """The Vault entity that the broker's credentials for ``spiffe_id`` belong to, if any.

        Raises:
            VaultUnavailableError, VaultError.
        """
        with self._errors("look up a workload's entity"):
            mounts = self._client.sys.list_auth_methods()
            accessor = (mounts.get("data", mounts).get("token/") or {}).get("accessor")
            if not accessor:
                return None
            try:
                resp = self._client.write("identity/lookup/entity", alias_name=spiffe_id,
                                          alias_mount_accessor=accessor)
            except hvac.exceptions.InvalidPath:
                return None
            if not isinstance(resp, dict):  # 204, no body: no entity has that alias
                return None
            return str(resp["data"]["id"]) if resp.get("data") else None

    def freeze_class_policy(self, cls: ActionClass) -> None:
        """Rewrite the class policy to grant nothing. Raises: VaultUnavailableError, VaultError."""
        with self._errors(f"freeze policy {cls.vault_policy_name}"):
            self._client.sys.create_or_update_policy(cls.vault_policy_name, FROZEN_POLICY)

    def empty_policy(self, name: str) -> None:
        """Rewrite a managed policy to grant nothing (a class removed from the map: its live
        tokens lose their power at once). Raises: VaultUnavailableError, VaultError."""
        with self._errors(f"empty policy {name}"):
            self._client.sys.create_or_update_policy(name, FROZEN_POLICY)

    def empty_policies(self, names: Iterable[str]) -> list[str]:
        """Rewrite each managed policy that exists and grants something to grant nothing (a
        class this Vault's environment no longer allows). Returns those rewritten.

        Raises: VaultUnavailableError, VaultError.
        """
        out = []
        for name in names:
            with self._errors(f"read policy {name}"):
                try:
                    current = self._client.sys.read_policy(name)["data"]["rules"]
                except hvac.exceptions.InvalidPath:
                    continue
            if current != FROZEN_POLICY:
                self.empty_policy(name)
                out.append(name)
        return out

    def restore_class_policy(self, cls: ActionClass) -> None:
        """Write the class's real policy back. Raises: VaultUnavailableError, VaultError."""
        with self._errors(f"restore policy {cls.vault_policy_name}"):
            self._client.sys.create_or_update_policy(cls.vault_policy_name,
                                                     cls.vault_policy_hcl())

    def list_accessors(self) -> set[str]:
        """Every token accessor Vault holds (needs ``list`` and ``sudo``).

        Raises:
            VaultUnavailableError, VaultError.
        """
        with self._errors("list token accessors"):
            resp = self._client.list("auth/token/accessors")
            if resp is None:  # 404: no token at all
                return set()
            keys = resp["data"]["keys"]  # anything else is not Vault's answer
            if not isinstance(keys, list):
                raise TypeError("keys is not a list")
            return {str(k) for k in keys}

    def managed_accessors(self, instance_id: str, *, skip: set[str] | frozenset[str] = frozenset(),
                          foreign: set[str] | None = None) -> dict[str, dict[str, str]]:
        """Live tokens this broker instance minted: accessor -> metadata.

        Accessors in ``skip`` are not looked up (the caller knows them). ``foreign``, if
        given, is a cache of accessors known not to be ours (a token's metadata never
        changes): they are not looked up again, and new ones are added to it.

        Raises:
            VaultUnavailableError, VaultError.
        """
        out: dict[str, dict[str, str]] = {}
        listed = self.list_accessors()
        if foreign is not None:
            foreign &= listed  # forget tokens that are gone
        for accessor in listed:
            if accessor in skip or (foreign is not None and accessor in foreign):
                continue
            info = self.lookup_accessor(accessor)
            if info is not None and info.metadata.get(MANAGED_META_KEY) == "1" \
                    and info.metadata.get("broker_instance") == instance_id:
                out[accessor] = dict(info.metadata)
            elif info is not None and foreign is not None:
                foreign.add(accessor)
        return out

    def revoke_accessor(self, accessor: str, *, check: bool = True) -> bool:
        """Revoke the token behind ``accessor``. False when it was already dead.

        ``check=False`` skips the look-up that tells the two apart (half the calls,
        for bulk revocation of tokens already known to be live) and returns True.

        Raises:
            VaultUnavailableError, VaultError.
        """
        # Vault answers 204 to revoke-accessor whether or not the token was alive,
        # so ask first: callers report "already dead" separately from "revoked".
        if check and self.lookup_accessor(accessor) is None:
            return False
        with self._errors("revoke a credential"):
            try:
                self._client.auth.token.revoke_accessor(accessor)
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
                return False
            except hvac.exceptions.Forbidden:
                if self._forbidden_means_gone():  # a token that never came to exist
                    return False
                raise
        return True


def _role_matches(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    for key, value in wanted.items():
        have = current.get(key)
        if isinstance(value, list):
            if sorted(have or []) != sorted(value):
                return False
        elif have != value:
            return False
    return True


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _tls_reason(exc: Exception) -> str:
    """The TLS library's reason, e.g. ``CERTIFICATE_VERIFY_FAILED``, without the URL noise."""
    text = str(exc)
    for reason in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "hostname mismatch"):
        if reason in text:
            return reason
    return type(exc).__name__
