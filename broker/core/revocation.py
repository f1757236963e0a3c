"""Freezes and revocation selectors (pure).

A freeze stops issuance for every identity matching a SPIFFE ID pattern, or for
a whole action class; it is checked before anything else when a request is
decided. A selector picks live credentials for mass revocation; its criteria
combine (all must match), and selecting everything needs ``all`` explicitly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import InvalidRequestError, InvalidSpiffeIdError


@dataclass(frozen=True, slots=True, kw_only=True)
class Freeze:
    id: str
    kind: str  # "spiffe_id" or "action_class"
    pattern: str
    reason: str
    by: str
    created_at: datetime

    def matches(self, spiffe_id: SpiffeId, action_class: str) -> bool:
        if self.kind == "action_class":
            return action_class == self.pattern
        return SpiffeIdPattern.parse(self.pattern).matches(spiffe_id)

    def describe(self) -> str:
        what = f"action class {self.pattern}" if self.kind == "action_class" else self.pattern
        return (f"{what} was frozen by {self.by} at {self.created_at.isoformat()}: "
                f"{self.reason}")


def freeze_target(spiffe_id: str, action_class: str) -> tuple[str, str]:
    """(kind, pattern) of a freeze request.

    Raises:
        InvalidRequestError: neither or both given, or the pattern is malformed.
    """
    if bool(spiffe_id) == bool(action_class):
        raise InvalidRequestError("freeze exactly one thing: --spiffe-id PATTERN or "
                                  "--action-class CLASS")
    if spiffe_id:
        try:
            SpiffeIdPattern.parse(spiffe_id)
        except InvalidSpiffeIdError as exc:
            raise InvalidRequestError(str(exc)) from None
        return "spiffe_id", spiffe_id
    return "action_class", action_class


def first_freeze(freezes: Iterable[Freeze], spiffe_id: SpiffeId,
                 action_class: str) -> Freeze | None:
    return next((f for f in freezes if f.matches(spiffe_id, action_class)), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Selector:
    spiffe_id: SpiffeIdPattern | None = None
    action_class: str = ""
    target: str = ""  # exact, or a pattern with * and ?
    since: datetime | None = None
    until: datetime | None = None
    credential_ids: frozenset[str] = frozenset()
    all: bool = False

    @classmethod
    def build(cls, *, spiffe_id: str = "", action_class: str = "", target: str = "",
              since: datetime | None = None, until: datetime | None = None,
              credential_ids: Iterable[str] = (), all: bool = False) -> Selector:
        """Raises: InvalidRequestError for an empty selector or a malformed pattern."""
        ids = frozenset(i for i in credential_ids if i)
        narrowed = bool(spiffe_id or action_class or target or since or until or ids)
        if not narrowed and not all:
            raise InvalidRequestError("no selector given: name --spiffe-id, --action-class, "
                                      "--target, --since/--until or --credential-id, or pass "
                                      "--all to select every live credential")
        if narrowed and all:
            raise InvalidRequestError("--all cannot be combined with other selectors")
        if since and until and since > until:
            raise InvalidRequestError("--since is after --until: nothing could match")
        pattern = None
        if spiffe_id:
            try:
                pattern = SpiffeIdPattern.parse(spiffe_id)
            except InvalidSpiffeIdError as exc:
                raise InvalidRequestError(str(exc)) from None
        return cls(spiffe_id=pattern, action_class=action_class, target=target, since=since,
                   until=until, credential_ids=ids, all=all)

    def matches(self, *, credential_id: str, spiffe_id: str, action_class: str, target: str,
                issued_at: datetime) -> bool:
        if self.all:
            return True
        if self.credential_ids and credential_id not in self.credential_ids:
            return False
        if self.spiffe_id is not None:
            try:
                if not self.spiffe_id.matches(SpiffeId.parse(spiffe_id)):
                    return False
            except InvalidSpiffeIdError:
                return False
        if self.action_class and action_class != self.action_class:
            return False
        if self.target and not fnmatch.fnmatchcase(target, self.target):
            return False
        if self.since and issued_at < self.since:
            return False
        return not (self.until and issued_at > self.until)

    def describe(self) -> str:
        if self.all:
            return "all"
        parts = []
        if self.spiffe_id is not None:
            parts.append(f"spiffe_id={self.spiffe_id}")
        if self.action_class:
            parts.append(f"action_class={self.action_class}")
        if self.target:
            parts.append(f"target={self.target}")
        if self.since:
            parts.append(f"since={self.since.isoformat()}")
        if self.until:
            parts.append(f"until={self.until.isoformat()}")
        if self.credential_ids:
            parts.append(f"credential_id={','.join(sorted(self.credential_ids))}")
        return " ".join(parts)
