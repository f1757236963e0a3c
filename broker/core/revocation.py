"""Freezes and revocation selectors (pure).

A freeze stops issuance for every identity matching a SPIFFE ID pattern, or for
a whole action class; it is checked before anything else when a request is
decided. A selector picks live credentials for mass revocation; its criteria
combine (all must match), and selecting everything needs ``all`` explicitly.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

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


#: What ``--since``/``--until`` accept, said the same way everywhere.
TIME_FORMS = ("a duration back from now (30s, 10m, 2h, 1d) or an RFC 3339 time with a zone "
              "(2026-11-27T03:00:00Z, 2026-11-27T04:00:00+01:00)")
_AGO = re.compile(r"(\d+)([smhd])")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: datetime, *, flag: str) -> datetime:
    """``10m``/``2h``/``1d`` (that long before ``now``) or an RFC 3339 time with a zone.

    Raises:
        InvalidRequestError: anything else, a time without a zone included; one line
            naming ``flag`` and the accepted forms.
    """
    value = text.strip()
    ago = _AGO.fullmatch(value)
    try:
        if ago:
            return now - timedelta(seconds=int(ago.group(1)) * _UNIT[ago.group(2)])
        if _RFC3339.fullmatch(value):
            return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        pass
    raise InvalidRequestError(f"{flag} {text!r} is not a time; write {TIME_FORMS}")


def check_known(*, spiffe_id: str = "", action_class: str = "", classes: Iterable[str],
                workloads: Iterable[SpiffeIdPattern], held: Iterable[tuple[str, str]]) -> None:
    """Refuse a selector naming what does not exist, so a typo cannot look like "all clear".

    ``classes`` and ``workloads`` are the scope map's; ``held`` is (SPIFFE ID, action
    class) of each live credential, which also counts (a class or workload may have
    left the map while its credentials live on).

    Raises:
        InvalidRequestError: the action class is unknown, or the SPIFFE ID pattern matches
            no workload named in the scope map and no holder of a live credential; the
            message names what exists.
    """
    held = list(held)
    if action_class:
        known = sorted(set(classes) | {c for _, c in held})
        if action_class not in known:
            raise InvalidRequestError(f"action class {action_class!r} is not in the scope map; "
                                      f"known: {', '.join(known) or 'none'}")
    if spiffe_id:
        try:
            pattern = SpiffeIdPattern.parse(spiffe_id)
        except InvalidSpiffeIdError as exc:
            raise InvalidRequestError(str(exc)) from None
        named = {str(w): w for w in workloads}
        if any(pattern.overlaps(w) for w in named.values()):
            return
        for sid, _ in held:
            try:
                if pattern.matches(SpiffeId.parse(sid)):
                    return
            except InvalidSpiffeIdError:
                continue
        raise InvalidRequestError(f"{spiffe_id} matches no workload named in the scope map "
                                  "(nor any holder of a live credential); workloads named "
                                  f"there: {', '.join(sorted(named)) or 'none'}")


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
    #: Only credentials minted in this environment's Vault ("": any).
    environment: str = ""
    #: The environment of credentials recorded without one (minted before the broker
    #: declared environments: by the default environment's Vault).
    default_environment: str = ""

    @classmethod
    def build(cls, *, spiffe_id: str = "", action_class: str = "", target: str = "",
              since: datetime | None = None, until: datetime | None = None,
              credential_ids: Iterable[str] = (), all: bool = False,
              environment: str = "", default_environment: str = "") -> Selector:
        """Raises: InvalidRequestError for an empty selector or a malformed pattern."""
        ids = frozenset(i for i in credential_ids if i)
        narrowed = bool(spiffe_id or action_class or target or since or until or ids
                        or environment)
        if not narrowed and not all:
            raise InvalidRequestError("no selector given: name --spiffe-id, --action-class, "
                                      "--target, --environment, --since/--until or "
                                      "--credential-id, or pass --all to select every live "
                                      "credential")
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
                   until=until, credential_ids=ids, all=all, environment=environment,
                   default_environment=default_environment)

    def matches(self, *, credential_id: str, spiffe_id: str, action_class: str, target: str,
                issued_at: datetime, environment: str = "") -> bool:
        if self.all:
            return True
        if self.credential_ids and credential_id not in self.credential_ids:
            return False
        if self.environment and (environment or self.default_environment) != self.environment:
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
        if self.environment:
            parts.append(f"environment={self.environment}")
        if self.since:
            parts.append(f"since={self.since.isoformat()}")
        if self.until:
            parts.append(f"until={self.until.isoformat()}")
        if self.credential_ids:
            parts.append(f"credential_id={','.join(sorted(self.credential_ids))}")
        return " ".join(parts)
