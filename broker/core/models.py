"""Values that cross the core's boundary: requests, identities, decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import NewType

from broker.core.spiffeid import SpiffeId

RequestId = NewType("RequestId", str)
CredentialId = NewType("CredentialId", str)  # the Vault token accessor


class Outcome(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    NEEDS_APPROVAL = "needs_approval"


class DenyCode(enum.Enum):
    """Why a request was denied; the boundary maps each to a status code."""

    FROZEN = "frozen"
    UNKNOWN_ACTION_CLASS = "unknown_action_class"
    WORKLOAD_NOT_ALLOWED = "workload_not_allowed"
    MISSING_FIELD = "missing_required_field"
    TARGET_NOT_ALLOWED = "target_not_allowed"
    TTL_TOO_LONG = "ttl_above_max"
    CONDITION_FALSE = "condition_false"
    BUDGET_EXHAUSTED = "budget_exhausted"
    FEDERATED_NOT_ALLOWED = "federated_not_allowed"
    ENVIRONMENT_NOT_ALLOWED = "environment_not_allowed"


@dataclass(frozen=True, slots=True, kw_only=True)
class InitiatingEvent:
    source: str
    id: str
    summary: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialRequest:
    """What a workload asks for. The identity is *not* part of it: it comes from mTLS."""

    action_class: str
    target: str = ""
    initiating_event: InitiatingEvent | None = None
    justification: str = ""
    ttl_seconds: int = 0  # 0: the class's TTL
    #: The environment (its own Vault) the credential is for; "" when the broker declares
    #: no environments (its one Vault). The broker resolves a request naming none to its
    #: default environment before deciding.
    environment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Owner:
    team: str
    contact: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome of evaluating one request under one scope map version."""

    outcome: Outcome
    spiffe_id: SpiffeId
    action_class: str
    rule: str
    reasons: tuple[str, ...]
    scope_map_version: str
    deny_code: DenyCode | None = None
    owner: Owner | None = None
    escalation: tuple[str, ...] = ()
    source: str = ""
    risk: str = ""
    ttl_seconds: int = 0
    policies: tuple[str, ...] = field(default=())
    #: For a denial that passes with time (``budget_exhausted``): seconds until the
    #: request would be allowed again, as far as the decision can tell; 0 otherwise.
    retry_after_seconds: int = 0
    #: False when the decision depends on the time (a ``when`` using ``now``): the same
    #: request later may be decided differently, so a cache must not answer it.
    reusable: bool = True
    #: Set when the class says this denial also freezes the identity (the rule that
    #: fired, e.g. ``enrichment.limits.on_exceed``); the service makes the freeze.
    freeze_rule: str = ""

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who is calling, as the gRPC boundary proved it (mTLS X.509-SVID, maybe a JWT-SVID)."""

    spiffe_id: SpiffeId
    x509_serial: str  # hex; how the identity was proven (audit)
    jwt_id: str = ""  # the JWT-SVID's jti when one was presented
    #: The caller's trust domain when it is a federated (foreign) one; "" for our own.
    federated_from: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MintedToken:
    """A credential Vault minted for one action class."""

    token: str = field(repr=False)  # secret: never log it
    accessor: str
    policies: tuple[str, ...]
    ttl_seconds: int
    expires_at: datetime
    entity_id: str
    #: ``sys/leases/revoke-prefix`` over this ends every token of this identity and class.
    lease_prefix: str = ""
