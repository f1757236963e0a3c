"""What a broker does to stay in step with other replicas on a shared (PostgreSQL) store.

:class:`FreezeFollower` re-reads the freezes in force every ``interval`` (0.5 s): a freeze
made through any replica is in force for issuance here within a second, and sidecars
connected here are told at once (they drop what they cached for it). Polling is the
mechanism, not a fallback: it needs nothing durable beyond the freezes table itself.
"""

from __future__ import annotations

import logging
import threading

from broker.errors import CredbrokerError
from broker.responder import BusEvent, Responder

_log = logging.getLogger("credbroker.replicas")

FREEZE_POLL_SECONDS = 0.5


class FreezeFollower:
    def __init__(self, responder: Responder, *, interval: float = FREEZE_POLL_SECONDS) -> None:
        self._responder = responder
        self._interval = interval
        self._stop = threading.Event()
        self._seen = {f.id for f in responder.freezes}
        self._failing = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="freeze-follower")

    def start(self) -> FreezeFollower:
        self._thread.start()
        return self

    def poll(self) -> int:
        """Read the freezes once; announce the new ones. Returns how many were new.

        Raises: StoreError.
        """
        known = self._seen | {f.id for f in self._responder.freezes}  # ours are announced
        current = self._responder.refresh_freezes()
        new = [f for f in current if f.id not in known]
        self._seen = {f.id for f in current}
        for fz in new:
            _log.warning("freeze %s of %s %s (by %s, through another replica) is in force here",
                         fz.id, fz.kind, fz.pattern, fz.by)
            self._responder.bus.publish(BusEvent(
                action_class=fz.pattern if fz.kind == "action_class" else "",
                identity_pattern=fz.pattern if fz.kind == "spiffe_id" else "",
                reason=fz.reason, by=fz.by))
        return len(new)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
                if self._failing:
                    _log.warning("freezes are read from the store again")
                self._failing = False
            except CredbrokerError as exc:  # issuance fails closed on the store anyway
                if not self._failing:
                    _log.error("cannot read freezes from the store (retrying): %s", exc)
                self._failing = True
            except Exception:  # the loop must outlive any one failure
                _log.exception("reading freezes failed unexpectedly; retrying")

    def stop(self) -> None:
        self._stop.set()
