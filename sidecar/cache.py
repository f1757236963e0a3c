"""The sidecar's credential cache (pure: time is passed in).

One credential per (action class, target). A cached credential is handed out
only while more than 20% of its life is left, so an agent never starts an
action with a token about to expire.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MIN_REMAINING_FRACTION = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedCredential:
    credential_id: str
    issued_at: datetime
    expires_at: datetime
    body: dict[str, Any]  # the 200 response body (holds the token: never log it)

    def fresh_at(self, now: datetime) -> bool:
        life = (self.expires_at - self.issued_at).total_seconds()
        left = (self.expires_at - now).total_seconds()
        return life > 0 and left > MIN_REMAINING_FRACTION * life


class CredentialCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], CachedCredential] = {}

    def get(self, action_class: str, target: str, now: datetime) -> CachedCredential | None:
        """The cached credential for the key if it is still fresh; stale ones are dropped."""
        key = (action_class, target)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.fresh_at(now):
                return entry
            del self._entries[key]
            return None

    def put(self, action_class: str, target: str, entry: CachedCredential) -> None:
        with self._lock:
            self._entries[(action_class, target)] = entry

    def drop(self, credential_id: str) -> bool:
        """Forget a credential (handed back or revoked). True if it was cached."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.credential_id == credential_id:
                    del self._entries[key]
                    return True
        return False

    def drop_class(self, action_class: str) -> int:
        with self._lock:
            keys = [k for k in self._entries if k[0] == action_class]
            for k in keys:
                del self._entries[k]
            return len(keys)

    def keep_only(self, credential_ids: set[str]) -> int:
        """Drop every entry whose credential is not in ``credential_ids``. Returns how many."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.credential_id not in credential_ids]
            for k in keys:
                del self._entries[k]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
