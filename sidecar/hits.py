"""Reporting cache hits to the broker, so every request an agent makes is on the record.

The agent's answer never waits for the report: :meth:`HitReporter.offer` only
puts the hit in a bounded buffer, and a background thread sends the buffer to
the broker (``ReportCacheHits``) in small batches. While the broker cannot be
reached the hits stay buffered and are resent (with back-off); once the buffer
is full, ``offer`` refuses, and the sidecar asks the broker instead of answering
from its cache: a request is never served without a record on its way.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from broker._proto.credbroker.v1 import broker_pb2 as pb

_log = logging.getLogger("credbroker.sidecar")

#: Hits buffered while the broker is unreachable; beyond it the cache is not used.
BUFFER_CAPACITY = 1000
#: Hits per ReportCacheHits call (the broker takes at most 100).
BATCH_SIZE = 50
#: Back-off between failed reports: from FIRST_RETRY doubling up to MAX_RETRY seconds.
FIRST_RETRY = 0.5
MAX_RETRY = 10.0

Send = Callable[[list[pb.CacheHit]], pb.ReportCacheHitsResponse]


class HitReporter:
    """A bounded buffer of cache hits and the thread that reports them."""

    def __init__(self, send: Send, *, capacity: int = BUFFER_CAPACITY,
                 batch_size: int = BATCH_SIZE) -> None:
        self._send = send
        self._capacity = capacity
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._hits: deque[pb.CacheHit] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
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

    def flush_once(self) -> bool:
        """Send one batch (the oldest hits). True when the broker answered (or there was
        nothing to send); False when it could not be reached (the hits stay buffered).
        Never raises."""
        with self._lock:
            batch = [self._hits[i] for i in range(min(self._batch_size, len(self._hits)))]
        if not batch:
            return True
        try:
            resp = self._send(batch)
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
            # Only this thread removes hits, and offer() appends at the right: the
            # batch is still the buffer's head.
            for _ in batch:
                self._hits.popleft()
        for r in resp.rejected:
            hit = batch[r.index] if r.index < len(batch) else None
            _log.error("the broker refused to record cache hit request_id=%s "
                       "credential_id=%s: %s", hit.request_id if hit else "?",
                       hit.credential_id if hit else "?", r.reason)
        return True

    def run(self, stop: threading.Event) -> None:
        """Report until ``stop`` is set, then try once more to send what is left."""
        delay = FIRST_RETRY
        while not stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while not stop.is_set() and self.pending:
                if self.flush_once():
                    delay = FIRST_RETRY
                    continue
                stop.wait(delay)
                delay = min(delay * 2, MAX_RETRY)
        while self.pending and self.flush_once():
            pass

    def start(self, stop: threading.Event) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, args=(stop,), name="report-hits",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float) -> int:
        """Wait (up to ``timeout`` seconds) for the reporting thread to end; log loudly what
        is left unreported. Returns how many hits that is."""
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.pending
        if left:
            _log.error("%d cache hit(s) could not be reported to the broker before the "
                       "sidecar stopped: those requests are not in the audit log", left)
        return left
