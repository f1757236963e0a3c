"""Automatic-freeze rules of the scope map (``limits.on_exceed``, ``limits.denials``): pure."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.core.limits import counts_as_denial, denial_trip, exceed_trip, limits_lines
from broker.core.models import CredentialRequest, DenyCode, Outcome
from broker.core.revocation import Freeze
from broker.core.scopemap import evaluate, parse_rate, parse_scope_map
from broker.core.scopemap.tools import explain_lines
from tests.unit.core.test_scopemap import NOW, TRIAGE, _class, _doc, _problems


def _map(limits: dict[str, str]):  # type: ignore[no-untyped-def]
    return parse_scope_map([("map.yaml", _doc({"enrichment": _class(limits=limits)}))])


def test_limits_parse_on_exceed_and_a_denial_rate() -> None:
    cls = _map({"per_workload": "2/h", "on_exceed": "freeze", "denials": "10/5m"}
               ).classes["enrichment"]
    assert cls.on_exceed == "freeze"
    assert cls.denial_trip is not None
    assert (cls.denial_trip.count, cls.denial_trip.window_seconds) == (10, 300)
    assert _map({"per_workload": "2/h"}).classes["enrichment"].on_exceed == "deny"


@pytest.mark.parametrize(("text", "seconds"), [("3/m", 60), ("3/h", 3600), ("3/d", 86400),
                                                ("3/90s", 90), ("3/5m", 300), ("3/2h", 7200)])
def test_denial_rates(text: str, seconds: int) -> None:
    rate = parse_rate(text)
    assert rate is not None and rate.window_seconds == seconds and rate.count == 3


@pytest.mark.parametrize("text", ["0/5m", "3", "3/0m", "3/5x", "three/h", "3/5d"])
def test_bad_denial_rates_are_refused(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize(("limits", "field", "says"), [
    ({"per_workload": "2/h", "on_exceed": "explode"}, "limits.on_exceed", "deny, freeze"),
    ({"on_exceed": "freeze"}, "limits.on_exceed", "per_workload"),
    ({"denials": "ten"}, "limits.denials", "e.g. 10/5m"),
    ({"per_workload": "2/h", "surprise": "1"}, "limits", "surprise"),
])
def test_bad_limits_are_reported_with_file_line_and_field(limits: dict[str, str], field: str,
                                                          says: str) -> None:
    problems = _problems(_doc({"enrichment": _class(limits=limits)}))
    assert any(field in p and says in p for p in problems), problems


def test_a_spent_budget_with_on_exceed_freeze_says_so_and_the_core_stays_pure() -> None:
    m = _map({"per_workload": "2/h", "on_exceed": "freeze"})
    req = CredentialRequest(action_class="enrichment")
    used = (NOW - timedelta(minutes=5), NOW - timedelta(minutes=1))
    d = evaluate(m, TRIAGE, req, NOW, used)
    assert d.deny_code is DenyCode.BUDGET_EXHAUSTED
    assert d.freeze_rule == "enrichment.limits.on_exceed"
    trip = exceed_trip(d)
    assert trip is not None and trip.rule == "enrichment.limits.on_exceed"
    # With the default (deny) the answer is the plain 429, no freeze.
    d2 = evaluate(_map({"per_workload": "2/h"}), TRIAGE, req, NOW, used)
    assert d2.deny_code is DenyCode.BUDGET_EXHAUSTED and not d2.freeze_rule
    assert exceed_trip(d2) is None and d2.retry_after_seconds > 0
    # Within budget: allowed, nothing to freeze.
    assert evaluate(m, TRIAGE, req, NOW, used[:1]).outcome is Outcome.ALLOW


def test_denial_trip_counts_only_denials_inside_the_window() -> None:
    cls = _map({"denials": "3/5m"}).classes["enrichment"]
    sid = str(TRIAGE)
    old = NOW - timedelta(minutes=6)
    assert denial_trip(cls, sid, (old, old, NOW - timedelta(minutes=1), NOW), NOW) is None
    trip = denial_trip(cls, sid, (NOW - timedelta(minutes=4), NOW - timedelta(minutes=1), NOW),
                       NOW)
    assert trip is not None and trip.rule == "enrichment.limits.denials"
    assert "3 times within 300s" in trip.reason
    assert denial_trip(_map({}).classes["enrichment"], sid, (NOW,) * 100, NOW) is None


def test_which_denials_count() -> None:
    m = _map({"denials": "3/5m"})
    other = evaluate(m, TRIAGE.__class__.parse("spiffe://example.org/agent/x"),
                     CredentialRequest(action_class="enrichment"), NOW)
    assert other.deny_code is DenyCode.WORKLOAD_NOT_ALLOWED and counts_as_denial(other)
    unknown = evaluate(m, TRIAGE, CredentialRequest(action_class="nope"), NOW)
    assert not counts_as_denial(unknown)
    fz = Freeze(id="f", kind="spiffe_id", pattern=str(TRIAGE), reason="r", by="credbroker",
                created_at=NOW)
    frozen = evaluate(m, TRIAGE, CredentialRequest(action_class="enrichment"), NOW, (), [fz])
    assert frozen.deny_code is DenyCode.FROZEN and not counts_as_denial(frozen)
    allowed = evaluate(m, TRIAGE, CredentialRequest(action_class="enrichment"), NOW)
    assert not counts_as_denial(allowed)


def test_explain_and_lint_show_the_rules() -> None:
    m = _map({"per_workload": "5/h", "on_exceed": "freeze", "denials": "10/5m"})
    cls = m.classes["enrichment"]
    lines = limits_lines(cls)
    assert any("per_workload 5/h" in x and "freeze the identity" in x for x in lines)
    assert any("denials 10/5m" in x and "10 denials" in x for x in lines)
    d = evaluate(m, TRIAGE, CredentialRequest(action_class="enrichment"), NOW)
    assert any(x.startswith("limits:") and "denials 10/5m" in x for x in explain_lines(d, m))
