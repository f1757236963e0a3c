"""``limits.per_workload`` budgets counted in the credential store.

Same interface as the in-memory ``UsageTracker`` the service used before (reserve →
record → forget), but every count lives in the store: a restart does not reset a
budget, and several brokers on one PostgreSQL store share one budget exactly (the store
holds a per-(identity, class) lock across the count and the slot taken).

In this process a decision also waits only for decisions of the same identity and
class (a per-key lock), so one busy identity does not hold pooled connections that
everyone else needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from broker.errors import CredbrokerError
from broker.registry import BudgetHold, CredentialStore

_log = logging.getLogger("credbroker.budget")

#: Issuances older than this are never counted (the longest budget window is a day).
HORIZON = timedelta(days=1)


class StoreBudget:
    def __init__(self, store: CredentialStore, *, horizon: timedelta = HORIZON) -> None:
        self._store = store
        self._horizon = horizon
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._held = threading.local()

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    @contextmanager
    def reserve(self, key: tuple[str, str], now: datetime) -> Iterator[tuple[datetime, ...]]:
        """Hold the key's budget (here and in the store): yield the issuances counted in the
        horizon; :meth:`record` inside takes one more, committed when this exits cleanly.

        Raises: StoreError (the store could not be used: nothing is decided).
        """
        with self._lock(key), self._store.budget_hold(key[0], key[1], now,
                                                      self._horizon) as hold:
            holds: dict[tuple[str, str], BudgetHold] = self._held.__dict__.setdefault(
                "holds", {})
            holds[key] = hold
            try:
                # A slot taken by a decision whose clock read later than ours (it got the
                # hold first; another replica's clock) is spent all the same: count it as now.
                yield tuple(min(t, now) for t in hold.recent)
            finally:
                holds.pop(key, None)

    def record(self, key: tuple[str, str], when: datetime) -> None:
        """Count an issuance (call while holding :meth:`reserve` for ``key``)."""
        holds: dict[tuple[str, str], BudgetHold] = self._held.__dict__.get("holds", {})
        hold = holds.get(key)
        if hold is None:
            raise RuntimeError(f"record({key!r}) outside reserve()")
        hold.take(when)

    def forget(self, key: tuple[str, str], when: datetime) -> None:
        """Give back the issuance counted at ``when`` (nothing was issued after all). Never
        raises: when the store cannot be written, the slot stays counted (fail closed: a
        budget may run out early, never late) and the caller's own error is what counts."""
        try:
            self._store.give_back(key[0], key[1], when)
        except CredbrokerError as exc:
            _log.warning("budget of %s for %s: an unused slot stays counted until it leaves "
                         "the window (%s)", key[0], key[1], exc)
