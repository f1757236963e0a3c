"""Server-side sessions: a random id in an HttpOnly, Secure, SameSite=Strict cookie.

The ID token stays on the server (it is sent to the broker with each act, never to
the browser). A session ends at the ID token's expiry, after ``max_age`` seconds, or
after ``idle`` seconds without a request; each carries its own CSRF token
(synchronizer token pattern), so a token from an older session is stale.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from broker.console.oidc import LoginState, Person

SESSION_COOKIE = "__Host-credbroker-console"
#: SameSite=Lax: it must come back on the identity provider's (cross-site) redirect.
LOGIN_COOKIE = "__Host-credbroker-login"
LOGIN_TTL = 600.0


@dataclass
class Session:
    id: str = field(repr=False)
    person: Person
    csrf: str = field(repr=False)
    expires_at: float
    last_seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)


class SessionStore:
    def __init__(self, *, max_age: float = 8 * 3600, idle: float = 1800) -> None:
        self.max_age = max_age
        self.idle = idle
        self._sessions: dict[str, Session] = {}
        self._logins: dict[str, LoginState] = {}

    def open(self, person: Person) -> Session:
        now = time.time()
        s = Session(id=secrets.token_urlsafe(32), person=person,
                    csrf=secrets.token_urlsafe(32),
                    expires_at=min(person.expires_at, now + self.max_age), last_seen=now)
        self._sessions[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session ``sid`` names (and marks it seen), else None."""
        self._expire()
        s = self._sessions.get(sid or "")
        if s is None:
            return None
        s.last_seen = time.time()
        return s

    def close(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def _expire(self) -> None:
        now = time.time()
        for sid in [k for k, s in self._sessions.items()
                    if now >= s.expires_at or now - s.last_seen >= self.idle]:
            del self._sessions[sid]
        for lid in [k for k, st in self._logins.items() if now - st.created >= LOGIN_TTL]:
            del self._logins[lid]

    def begin_login(self, st: LoginState) -> str:
        self._expire()
        lid = secrets.token_urlsafe(24)
        self._logins[lid] = st
        return lid

    def end_login(self, lid: str | None) -> LoginState | None:
        self._expire()
        return self._logins.pop(lid or "", None)
