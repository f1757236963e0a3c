"""Scope maps as values: the action classes, their rules, and the limits no map can exceed.

Built by :mod:`broker.core.scopemap.parse`, decided on by
:mod:`broker.core.scopemap.evaluate`. Nothing here does I/O or parsing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from broker.core.conditions import Condition
from broker.core.models import Owner
from broker.core.spiffeid import SpiffeIdPattern

API_VERSION = "credbroker/v1"
KIND = "ScopeMap"
#: Credentials are minutes-long: no class may allow more than this.
HARD_MAX_TTL_SECONDS = 3600
#: Capabilities a class may grant. ``sudo``/``root``-like powers are never handed to agents.
ALLOWED_CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list"})
RISKS = ("low", "high", "destructive")
FEDERATED_MODES = ("deny", "approval", "allow")
#: What a class's ``environments:`` block may say of one environment.
ENVIRONMENT_MODES = ("allow", "approval", "deny")
REQUIRABLE_FIELDS = ("initiating_event", "target", "justification")
#: Vault's control plane. No class may hold a path that could match anything under
#: these, and no allow-list can admit them. Each names what a credential there could do.
RESERVED_MOUNTS: Mapping[str, str] = {
    "sys/": "policies, mounts, audit devices",
    "auth/": "token roles, token creation",
    "identity/": "entities, the kill switch",
}
#: Where the broker keeps each class's own Vault objects (``<prefix><class>``).
MANAGED_PREFIXES = ("sys/policies/acl/credbroker-", "sys/policy/credbroker-",
                    "auth/token/roles/credbroker-", "auth/token/create/credbroker-")
#: The mounts a class's vault_policy may reach when the operator names none:
#: the KV v2 mount that ``bao server -dev`` (and so ``credbroker dev``) provides.
DEFAULT_VAULT_ALLOWED_MOUNTS = ("secret/",)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    path: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """``limits.per_workload``: at most ``count`` credentials per ``window_seconds``."""

    count: int
    window_seconds: int
    text: str


DEFAULT_BREAK_GLASS_LIMIT = Budget(count=1, window_seconds=3600, text="1/h")

@dataclass(frozen=True, slots=True, kw_only=True)
class BreakGlass:
    allowed: bool
    max_ttl_seconds: int
    reviewers: tuple[str, ...]
    #: At most this many break-glass uses per identity per window (``break_glass.limit``):
    #: an emergency path that is used on every request is no longer an emergency path.
    limit: Budget = DEFAULT_BREAK_GLASS_LIMIT


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRule:
    """``approval: {mode: jit, ...}``: a person must approve each request."""

    approvers: tuple[str, ...]  # approver groups
    approvals_required: int
    escalate_after_seconds: int
    expires_seconds: int
    break_glass: BreakGlass | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionClass:
    name: str
    description: str
    risk: str
    owner: Owner
    escalation: tuple[str, ...]
    workloads: tuple[SpiffeIdPattern, ...]
    ttl_seconds: int
    max_ttl_seconds: int
    vault_policy: tuple[PolicyRule, ...]
    requires: tuple[str, ...]
    source: str  # "file:line"
    approval: ApprovalRule | None = None  # None: approval: none
    targets: tuple[str, ...] = ()
    budget: Budget | None = None
    when: Condition | None = None
    #: ``limits.on_exceed``: what a spent budget does besides refusing ("deny" or "freeze").
    on_exceed: str = "deny"
    #: ``limits.denials``: this many denials of one identity for this class within the
    #: window freeze that identity.
    denial_trip: Budget | None = None
    #: Callers of a federated (foreign) trust domain: "deny" (the default), "approval"
    #: (they need approval: the class's JIT rule, else ``federated_approval``) or "allow".
    federated: str = "deny"
    #: ``federated_approvers``: the approval federated callers need when the class has
    #: no JIT rule of its own.
    federated_approval: ApprovalRule | None = None
    #: ``environments:``: environment name -> allow | approval | deny. Empty: the class is
    #: decided by its other rules alone in every environment (as with no environments).
    #: An environment the block does not name is denied.
    environments: Mapping[str, str] = field(default_factory=dict)

    def environment_mode(self, environment: str) -> str:
        """allow, approval or deny in ``environment``; "" when the class has no block."""
        if not self.environments:
            return ""
        return self.environments.get(environment, "deny")

    @property
    def approval_rule(self) -> ApprovalRule | None:
        """The rule an approval of this class follows (its own, else the federated one)."""
        return self.approval or self.federated_approval

    @property
    def vault_policy_name(self) -> str:
        """The Vault policy (and token role) name this class is minted under."""
        return f"credbroker-{self.name}"

    def vault_policy_hcl(self) -> str:
        """The class's Vault policy document (HCL)."""
        blocks = []
        for rule in self.vault_policy:
            caps = ", ".join(f'"{c}"' for c in rule.capabilities)
            blocks.append(f'path "{rule.path}" {{\n  capabilities = [{caps}]\n}}\n')
        return f"# managed by credbroker: action class {self.name}\n" + "".join(blocks)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScopeMap:
    version: str  # "sha256:<hex>" over the documents' bytes
    classes: Mapping[str, ActionClass]
    sources: tuple[str, ...]
    #: Each file's owning team (``metadata.team``), by source name; files without one
    #: are absent.
    teams: Mapping[str, str] = field(default_factory=dict)
    #: The environments the map's documents declare (``environments:`` at the top), in
    #: order of first declaration; the broker must declare each of them.
    environments: tuple[str, ...] = ()

    def in_environment(self, environment: str) -> ScopeMap:
        """This map with only the classes that may be minted in ``environment`` (those
        whose ``environments:`` block does not deny it): what that environment's Vault
        holds policies and token roles for."""
        return replace(self, classes={n: c for n, c in self.classes.items()
                                      if c.environment_mode(environment) != "deny"})
