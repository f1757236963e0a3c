"""The scope map's automatic freezes (pure): when a class's ``limits`` say to freeze.

Two rules can freeze an identity on their own, with no person in the loop:

* ``limits.on_exceed: freeze`` — the identity asked past its ``per_workload`` budget
  (:func:`broker.core.scopemap.evaluate` sets ``Decision.freeze_rule``);
* ``limits.denials: N/<window>`` — the identity was denied this class N times within
  the window (:func:`denial_trip`).

Nothing here does I/O: the service counts, asks, and makes the freeze.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.core.models import Decision, DenyCode, Outcome
from broker.core.scopemap import ActionClass


@dataclass(frozen=True, slots=True, kw_only=True)
class Trip:
    """An automatic freeze the scope map calls for."""

    rule: str  # e.g. "enrichment.limits.denials"
    reason: str


def counts_as_denial(decision: Decision) -> bool:
    """Whether a decision counts towards ``limits.denials``: any denial of a class in the
    map, except ``frozen`` (the identity is stopped already)."""
    return (decision.outcome is Outcome.DENY and decision.deny_code is not DenyCode.FROZEN
            and decision.deny_code is not DenyCode.UNKNOWN_ACTION_CLASS)


def denial_trip(cls: ActionClass, spiffe_id: str, denials: Sequence[datetime],
                now: datetime) -> Trip | None:
    """The freeze ``cls.limits.denials`` calls for, given the times ``spiffe_id`` was denied
    ``cls`` (this denial included), or None."""
    rate = cls.denial_trip
    if rate is None:
        return None
    since = now - timedelta(seconds=rate.window_seconds)
    counted = sum(1 for t in denials if since < t <= now)
    if counted < rate.count:
        return None
    return Trip(rule=f"{cls.name}.limits.denials",
                reason=f"{spiffe_id} was denied {cls.name} {counted} times within "
                       f"{rate.window_seconds}s (limit {rate.text}; rule {cls.name}.limits at "
                       f"{cls.source})")


def exceed_trip(decision: Decision) -> Trip | None:
    """The freeze a spent budget calls for (``limits.on_exceed: freeze``), or None."""
    if not decision.freeze_rule:
        return None
    return Trip(rule=decision.freeze_rule,
                reason=decision.reasons[0] if decision.reasons else
                f"{decision.spiffe_id} asked for {decision.action_class} past its budget")


def limits_lines(cls: ActionClass) -> list[str]:
    """What the class's ``limits`` do, one line each (for ``scope explain`` and ``lint``)."""
    out: list[str] = []
    if cls.budget is not None:
        then = ("refuse the request AND freeze the identity (only a person may lift it)"
                if cls.on_exceed == "freeze" else "refuse the request (429) until the window "
                "frees up")
        out.append(f"{cls.name}.limits.per_workload {cls.budget.text}: past it, {then}")
    if cls.denial_trip is not None:
        out.append(f"{cls.name}.limits.denials {cls.denial_trip.text}: "
                   f"{cls.denial_trip.count} denials of one identity within "
                   f"{cls.denial_trip.window_seconds}s freeze that identity (only a person "
                   "may lift it)")
    return out
