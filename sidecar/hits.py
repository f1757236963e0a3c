"""Reporting cache hits to the broker, so every request an agent makes is on the record.

The agent's answer never waits for the report: :meth:`HitReporter.offer` only
puts the hit in a bounded buffer, and a background thread sends the buffer to
the broker (``ReportCacheHits``) in small batches. While the broker cannot be
reached the hits stay buffered and are resent (with back-off); once the buffer
is full, ``offer`` refuses, and the sidecar asks the broker instead of answering
from its cache: a request is never served without a record on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable

from broker._proto.credbroker.v1 import broker_pb2 as pb

_log = logging.getLogger("credbroker.sidecar")

#: Hits buffered while the broker is unreachable; beyond it the cache is not used.
BUFFER_CAPACITY = 1000
#: Hits per ReportCacheHits call (the broker takes at most 100).
BATCH_SIZE = 50
#: Back-off between failed reports: from FIRST_RETRY doubling up to MAX_RETRY seconds.
FIRST_RETRY = 0.5
MAX_RETRY = 10.0

Send = Callable[[list[pb.CacheHit]], Awaitable[pb.ReportCacheHitsResponse]]


class HitReporter:
    """A bounded buffer of cache hits and the task that reports them.

    :meth:`offer` and :meth:`run` are called on the sidecar's loop; :attr:`pending` may be
    read from any thread.
    """

    def __init__(self, send: Send, *, capacity: int = BUFFER_CAPACITY,
                 batch_size: int = BATCH_SIZE) -> None:
        self._send = send
        self._capacity = capacity
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._hits: deque[pb.CacheHit] = deque()
        self._wake = asyncio.Event()
        self._failing = False

    def offer(self, hit: pb.CacheHit) -> bool:
        """Buffer ``hit`` for reporting. False (nothing buffered) when the buffer is full:
        the caller must then not serve the request from the cache."""
        with self._lock:
            if len(self._hits) >= self._capacity:
                return False
            self._hits.append(hit)
        self._wake.set()
        return True

    @property
    def pending(self) -> int:
        """Hits not yet confirmed by the broker."""
        with self._lock:
            return len(self._hits)

    async def flush_once(self) -> bool:
        """Send one batch (the oldest hits). True when the broker answered (or there was
        nothing to send); False when it could not be reached (the hits stay buffered).
        Never raises."""
        with self._lock:
            batch = [self._hits[i] for i in range(min(self._batch_size, len(self._hits)))]
        if not batch:
            return True
        try:
            resp = await self._send(batch)
        except Exception as exc:  # BrokerCallError, or anything: the hits stay buffered
            if not self._failing:
                _log.warning("cannot report %d cache hit(s) to the broker (%s); kept and "
                             "retried; the cache is not used once %d are waiting",
                             self.pending, exc, self._capacity)
            self._failing = True
            return False
        if self._failing:
            _log.warning("cache hits reported to the broker again")
        self._failing = False
        with self._lock:
            # Only this task removes hits, and offer() appends at the right: the
            # batch is still the buffer's head.
            for _ in batch:
                self._hits.popleft()
        for r in resp.rejected:
            hit = batch[r.index] if r.index < len(batch) else None
            _log.error("the broker refused to record cache hit request_id=%s "
                       "credential_id=%s: %s", hit.request_id if hit else "?",
                       hit.credential_id if hit else "?", r.reason)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Report until ``stop`` is set, then try once more to send what is left."""
        delay = FIRST_RETRY
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            self._wake.clear()
            while not stop.is_set() and self.pending:
                if await self.flush_once():
                    delay = FIRST_RETRY
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, MAX_RETRY)
        while self.pending and await self.flush_once():
            pass

    def log_unreported(self) -> int:
        """Log loudly how many hits are left unreported (the sidecar is stopping); returns
        that number."""
        left = self.pending
        if left:
            _log.error("%d cache hit(s) could not be reported to the broker before the "
                       "sidecar stopped: those requests are not in the audit log", left)
        return left
