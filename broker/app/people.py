"""Who acts: every revoke, freeze, unfreeze, approval, denial and sign-off names a person.

The responder's tool connects with an admin SVID (mTLS): that proves the *tool*,
not who typed the command. The person comes with the call, as their OIDC ID token
in the gRPC metadata key ``authorization-person`` (``Bearer <ID token>``; the
approvals API also takes the older ``id_token`` request field). The broker
verifies it with :class:`broker.adapters.approvers.OidcVerifier` (signature against the
configured JWKS, exact issuer, audience, expiry) and records the person's
subject (their verified e-mail, else ``sub``) as ``by``.

Only SPIFFE IDs configured as automation (``--automation-id``) may act without a
person; they are recorded as ``automation:<SPIFFE ID>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from broker.adapters.approvers import ApproverTokenError, OidcVerifier
from broker.core.approvals import Approver
from broker.core.teams import teams_of
from broker.errors import IdentityError, InvalidRequestError, PolicyError
from broker.wire.inputs import ID_TOKEN_MAX

#: The gRPC metadata key carrying the person's ID token: ``Bearer <ID token>``.
PERSON_MD_KEY = "authorization-person"
LOGIN_HINT = ("run `credbroker login` (or pass --id-token-file FILE, or --as USER with "
              "--dev DIR)")


class PersonRequiredError(IdentityError):
    """An action that must name a person came without one (and not from automation)."""

    code = "person_required"


class NotResponderError(PolicyError):
    """The person is not in any of the groups that may revoke, freeze and unfreeze;
    ``person`` is who they proved to be (their refused attempt is audited as them)."""

    code = "not_responder"

    def __init__(self, message: str, *, person: Approver) -> None:
        super().__init__(message)
        self.person = person


@dataclass(frozen=True, slots=True, kw_only=True)
class Actor:
    """Who an action is recorded as: a person (``by`` = subject) or configured automation
    (``by`` = ``automation:<SPIFFE ID>``); ``client`` is the mTLS SPIFFE ID it came over."""

    by: str
    kind: str  # "person" or "automation"
    client: str
    groups: tuple[str, ...] = ()
    issuer: str = ""
    #: The teams it acts for (``--team-scope``); None: every team.
    teams: frozenset[str] | None = None

    def audit(self) -> dict[str, Any]:
        """The ``actor`` field of the audit record (no token, ever); ``teams`` only for a
        team-scoped actor."""
        out: dict[str, Any] = {"kind": self.kind, "client": self.client}
        if self.kind == "person":
            out.update(issuer=self.issuer, groups=list(self.groups))
        if self.teams is not None:
            out["teams"] = sorted(self.teams)
        return out


def person_token(context: grpc.ServicerContext) -> str:
    """The ID token in the call's ``authorization-person`` metadata, or ``""``.

    Raises:
        InvalidRequestError: the value is not ``Bearer <token>``, the key is repeated, or
            the token is longer than ID_TOKEN_MAX (the message never repeats the value).
    """
    values = [v for k, v in (context.invocation_metadata() or ()) if k == PERSON_MD_KEY]
    if not values:
        return ""
    if len(values) > 1:
        raise InvalidRequestError(f"{PERSON_MD_KEY} is given more than once")
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidRequestError(f"{PERSON_MD_KEY} must be 'Bearer <ID token>'")
    if len(token) > ID_TOKEN_MAX:
        raise InvalidRequestError(f"the ID token in {PERSON_MD_KEY} is longer than "
                                  f"{ID_TOKEN_MAX} characters")
    return token.strip()


def verify_person(verifier: OidcVerifier, token: str) -> Approver:
    """The person ``token`` names. Raises: ApproverTokenError (UNAUTHENTICATED) saying why
    and how to get a valid one."""
    try:
        return verifier.verify(token)
    except ApproverTokenError as exc:
        text = str(exc)
        if "credbroker login" in text:
            raise
        raise ApproverTokenError(f"{text}; {LOGIN_HINT}") from None


class ResponderGate:
    """Decides who a responder action (revoke, freeze, unfreeze) is recorded as, and for
    which teams it acts (``team_scopes``, :func:`broker.core.teams.teams_of`)."""

    def __init__(self, *, verifier: OidcVerifier, groups: Iterable[str],
                 automation: Iterable[str],
                 team_scopes: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self._verifier = verifier
        self.groups = tuple(groups)
        self.automation = frozenset(automation)
        self.team_scopes: Mapping[str, tuple[str, ...]] = dict(team_scopes or {})

    def actor(self, context: grpc.ServicerContext, client: str, what: str) -> Actor:
        """The person whose ID token came with the call, else the configured automation.

        Raises:
            InvalidRequestError: a malformed ``authorization-person`` value.
            ApproverTokenError: the ID token was refused (expired, forged, wrong issuer or
                audience); UNAUTHENTICATED, with the login hint.
            PersonRequiredError: no ID token and ``client`` is not configured automation;
                UNAUTHENTICATED, with the login hint.
            NotResponderError: the person is in none of the responder groups;
                PERMISSION_DENIED.
        """
        token = person_token(context)
        if token:
            person = verify_person(self._verifier, token)
            if not set(person.groups) & set(self.groups):
                raise NotResponderError(
                    f"{person.subject} may not {what}: only members of "
                    f"{', '.join(self.groups) or '(no group configured)'} may revoke, freeze "
                    f"and unfreeze; their groups: {', '.join(person.groups) or 'none'}",
                    person=person)
            granting = [g for g in person.groups if g in self.groups]
            return Actor(by=person.subject, kind="person", client=client, groups=person.groups,
                         issuer=person.issuer,
                         teams=teams_of(self.team_scopes, groups=granting))
        if client in self.automation:
            return Actor(by=f"automation:{client}", kind="automation", client=client,
                         teams=teams_of(self.team_scopes, spiffe_id=client))
        raise PersonRequiredError(f"to {what}, the broker needs to know who you are: "
                                  f"{LOGIN_HINT}")
