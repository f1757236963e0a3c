"""``limits.per_workload`` budgets counted in the credential store.

One context per issuance (:meth:`StoreBudget.spend`: hold, decide, take, commit — and
give back if the issuance fails), and every count lives in the store: a restart does not
reset a budget, and several brokers on one PostgreSQL store share one budget exactly (the store
holds a per-(identity, class) lock across the count and the slot taken).

In this process a decision also waits only for decisions of the same identity and
class (a per-key lock), so one busy identity does not hold pooled connections that
everyone else needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TypeVar

from broker.adapters.registry import CredentialStore
from broker.errors import CredbrokerError

_log = logging.getLogger("credbroker.budget")

_D = TypeVar("_D")

#: Issuances older than this are never counted (the longest budget window is a day).
HORIZON = timedelta(days=1)


class StoreBudget:
    def __init__(self, store: CredentialStore, *, horizon: timedelta = HORIZON) -> None:
        self._store = store
        self._horizon = horizon
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    @contextmanager
    def spend(self, key: tuple[str, str], now: datetime,
              decide: Callable[[tuple[datetime, ...]], tuple[_D, bool]], *,
              counted: bool = True) -> Iterator[_D]:
        """Decide one issuance and spend the key's budget for it, as one context.

        ``decide(recent)`` runs while the key is held (in this process and in the store,
        so no decision of any replica counts it meanwhile) with the issuances counted in
        the horizon, and returns ``(value, take)``. With ``take`` one slot is counted and
        committed when the hold is released — before the body runs, so no concurrent
        decision passes the budget. The body is the issuance: if it raises, the slot is
        given back (nothing was issued); a clean exit keeps it. ``counted=False`` (the
        class has no budget): nothing is held or counted, ``decide(())`` runs at once.

        Raises: StoreError (the store could not be used: nothing was decided), and what
            ``decide`` or the body raise.
        """
        if not counted:
            yield decide(())[0]
            return
        with self._lock(key), self._store.budget_hold(key[0], key[1], now,
                                                      self._horizon) as hold:
            # A slot taken by a decision whose clock read later than ours (it got the hold
            # first; another replica's clock) is spent all the same: count it as now.
            value, take = decide(tuple(min(t, now) for t in hold.recent))
            if take:
                hold.take(now)
        try:
            yield value
        except BaseException:
            if take:
                self._give_back(key, now)
            raise

    def _give_back(self, key: tuple[str, str], when: datetime) -> None:
        """Give back the issuance counted at ``when`` (nothing was issued after all). Never
        raises: when the store cannot be written, the slot stays counted (fail closed: a
        budget may run out early, never late) and the caller's own error is what counts."""
        try:
            self._store.give_back(key[0], key[1], when)
        except CredbrokerError as exc:
            _log.warning("budget of %s for %s: an unused slot stays counted until it leaves "
                         "the window (%s)", key[0], key[1], exc)
