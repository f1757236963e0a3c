"""The sidecar's credential cache (pure: time is passed in).

A credential answers from the cache only a request identical to the one it was
minted for: the same action class, target, initiating event (source, id and
summary), justification and requested TTL — the key is a canonical hash of
those fields (:func:`request_key`). Any other request goes to the broker and
gets its own decision. A cached credential is handed out only while more than
20% of its life is left, so an agent never starts an action with a token about
to expire, and, when the request names ``ttl_seconds``, only while at least that
many seconds are left.

Every entry remembers the scope-map version that decided it; once the broker
says another version is in force (:meth:`CredentialCache.set_version`), entries
decided under any other are dropped and never stored again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker._proto.credbroker.v1 import broker_pb2 as pb

MIN_REMAINING_FRACTION = 0.2


def request_key(msg: pb.IssueCredentialRequest) -> str:
    """The cache key of a request: SHA-256 of its canonical JSON (every field that could
    change the broker's decision or the credential's life, and nothing else)."""
    ev = msg.initiating_event if msg.HasField("initiating_event") else None
    fields = {
        "action_class": msg.action_class,
        "target": msg.target,
        "initiating_event": [ev.source, ev.id, ev.summary] if ev is not None else None,
        "justification": msg.justification,
        "ttl_seconds": msg.ttl_seconds,
        # Only when named, so keys of requests without one stay as they were.
        **({"environment": msg.environment} if msg.environment else {}),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedCredential:
    credential_id: str
    issued_at: datetime
    expires_at: datetime
    body: dict[str, Any]  # the 200 response body (holds the token: never log it)
    action_class: str  # as the broker decided it (freezes name it so)
    scope_map_version: str  # of the decision that minted it

    def fresh_at(self, now: datetime, ttl_seconds: int = 0) -> bool:
        """More than 20% of its life left, and at least ``ttl_seconds`` (when not 0)."""
        life = (self.expires_at - self.issued_at).total_seconds()
        left = (self.expires_at - now).total_seconds()
        return life > 0 and left > MIN_REMAINING_FRACTION * life and left >= ttl_seconds


class CredentialCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, CachedCredential] = {}
        self._version = ""  # the scope-map version in force, once the broker said so

    @property
    def version(self) -> str:
        return self._version

    def get(self, key: str, now: datetime, ttl_seconds: int = 0) -> CachedCredential | None:
        """The credential cached under ``key`` if it is still fresh (and has ``ttl_seconds``
        left when that is not 0); entries past their 20% are dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.fresh_at(now, ttl_seconds):
                return entry
            if not entry.fresh_at(now):
                del self._entries[key]
            return None

    def put(self, key: str, entry: CachedCredential) -> bool:
        """Cache ``entry`` under ``key`` unless it was decided under a scope-map version other
        than the one in force. True if it was cached."""
        with self._lock:
            if self._version and entry.scope_map_version != self._version:
                return False
            self._entries[key] = entry
            return True

    def set_version(self, version: str) -> int:
        """The broker says ``version`` is in force: drop every entry decided under another
        (from now on, such entries are not cached). An empty version (an older broker)
        changes nothing. Returns how many were dropped."""
        if not version:
            return 0
        with self._lock:
            self._version = version
            keys = [k for k, e in self._entries.items() if e.scope_map_version != version]
            for k in keys:
                del self._entries[k]
            return len(keys)

    def holds(self, credential_id: str) -> bool:
        with self._lock:
            return any(e.credential_id == credential_id for e in self._entries.values())

    def drop(self, credential_id: str) -> bool:
        """Forget a credential (handed back or revoked). True if it was cached."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.credential_id == credential_id]
            for k in keys:
                del self._entries[k]
            return bool(keys)

    def drop_class(self, action_class: str) -> int:
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.action_class == action_class]
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
