"""What revoke, freeze and `credentials list` accept as selectors, before anything happens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.core.revocation import TIME_FORMS, check_known, parse_when
from broker.core.spiffeid import SpiffeIdPattern
from broker.errors import InvalidRequestError

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expect"), [
    ("10m", NOW - timedelta(minutes=10)),
    ("2h", NOW - timedelta(hours=2)),
    ("1d", NOW - timedelta(days=1)),
    ("30s", NOW - timedelta(seconds=30)),
    ("2026-11-27T01:00:00Z", datetime(2026, 11, 27, 1, tzinfo=UTC)),
    ("2026-11-27t01:00:00z", datetime(2026, 11, 27, 1, tzinfo=UTC)),
    ("2026-11-27T02:00:00+01:00", datetime(2026, 11, 27, 1, tzinfo=UTC)),
    ("2026-11-27T01:00:00.123456Z", datetime(2026, 11, 27, 1, 0, 0, 123456, tzinfo=UTC)),
])
def test_durations_and_zoned_rfc3339_times_are_accepted(text: str, expect: datetime) -> None:
    assert parse_when(text, NOW, flag="--since") == expect


@pytest.mark.parametrize("text", [
    "2026-11-27T01:00:00",        # no zone: whose 01:00?
    "2026-11-27",                 # a date
    "2026-11-27T01:00Z",          # no seconds: not RFC 3339
    "10 minutes", "10min", "-10m", "m", "", "yesterday", "2026-13-40T01:00:00Z",
])
def test_anything_else_is_refused_in_one_line_naming_the_accepted_forms(text: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_when(text, NOW, flag="--until")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"--until {text!r} is not a time")
    assert TIME_FORMS in msg and "10m" in msg and "Z" in msg


MAP_WORKLOADS = [SpiffeIdPattern.parse(p) for p in (
    "spiffe://example.org/agent/triage", "spiffe://example.org/agent/containment",
    "spiffe://example.org/ns/soc/**")]
CLASSES = ["enrichment", "containment.isolate_host"]


def test_an_unknown_action_class_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_known(action_class="enrichmnt", classes=CLASSES, workloads=MAP_WORKLOADS, held=[])
    assert "'enrichmnt' is not in the scope map" in str(err.value)
    assert "containment.isolate_host, enrichment" in str(err.value)
    check_known(action_class="enrichment", classes=CLASSES, workloads=MAP_WORKLOADS, held=[])
    # A class that left the map while its credentials live on can still be selected.
    check_known(action_class="legacy", classes=CLASSES, workloads=MAP_WORKLOADS,
                held=[("spiffe://example.org/agent/triage", "legacy")])


@pytest.mark.parametrize("pattern", [
    "spiffe://example.org/agent/triage", "spiffe://example.org/agent/*",
    "spiffe://example.org/agent/tri*", "spiffe://example.org/**",
    "spiffe://example.org/ns/soc/a/b", "spiffe://example.org/ns/*/x",
    "spiffe://example.org/ns/soc/**",
])
def test_a_pattern_that_can_match_a_named_workload_is_accepted(pattern: str) -> None:
    check_known(spiffe_id=pattern, classes=CLASSES, workloads=MAP_WORKLOADS, held=[])


@pytest.mark.parametrize("pattern", [
    "spiffe://example.org/nobody", "spiffe://example.org/agent/triag",
    "spiffe://example.org/agent/triage/x", "spiffe://other.org/agent/triage",
    "spiffe://example.org/ns/soc", "spiffe://example.org/agent/x*",
])
def test_a_pattern_that_matches_no_named_workload_is_refused_naming_them(pattern: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_known(spiffe_id=pattern, classes=CLASSES, workloads=MAP_WORKLOADS, held=[])
    msg = str(err.value)
    assert f"{pattern} matches no workload named in the scope map" in msg
    assert "spiffe://example.org/agent/containment" in msg and "/ns/soc/**" in msg


def test_a_holder_of_a_live_credential_counts_as_existing() -> None:
    check_known(spiffe_id="spiffe://example.org/retired/*", classes=CLASSES,
                workloads=MAP_WORKLOADS, held=[("spiffe://example.org/retired/x", "enrichment")])


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("spiffe://t/a/b", "spiffe://t/a/b", True),
    ("spiffe://t/a/b", "spiffe://t/a/c", False),
    ("spiffe://t/a/*", "spiffe://t/a/b", True),
    ("spiffe://t/a/*", "spiffe://t/a/b/c", False),
    ("spiffe://t/a/**", "spiffe://t/a", False),
    ("spiffe://t/a/**", "spiffe://t/a/b/c", True),
    ("spiffe://t/a/**", "spiffe://t/*/x/**", True),
    ("spiffe://t/x-*", "spiffe://t/*-y", True),
    ("spiffe://t/x-*", "spiffe://t/y-*", False),
    ("spiffe://t/*-a", "spiffe://t/*-b", False),
    ("spiffe://t/a", "spiffe://u/a", False),
])
def test_pattern_overlap(a: str, b: str, overlap: bool) -> None:
    pa, pb = SpiffeIdPattern.parse(a), SpiffeIdPattern.parse(b)
    assert pa.overlaps(pb) is overlap and pb.overlaps(pa) is overlap


def test_an_environment_alone_is_a_selector_and_matches_only_its_credentials() -> None:
    from broker.core.revocation import Selector

    sel = Selector.build(environment="sandbox")
    assert sel.describe() == "environment=sandbox"
    common = {"credential_id": "a", "spiffe_id": "spiffe://example.org/agent/t",
              "action_class": "c", "target": "t", "issued_at": NOW}
    assert sel.matches(**common, environment="sandbox")
    assert not sel.matches(**common, environment="production")
    assert not sel.matches(**common)  # a credential of a broker without environments
    both = Selector.build(action_class="c", environment="production")
    assert both.matches(**common, environment="production")
    assert not both.matches(**{**common, "action_class": "d"}, environment="production")
    assert Selector.build(action_class="c").matches(**common, environment="sandbox")


def test_credentials_recorded_without_an_environment_count_as_the_default_ones() -> None:
    """Minted before the broker declared environments, by the default environment's Vault:
    `--environment production` (the default) selects them too, `sandbox` does not."""
    from broker.core.revocation import Selector

    common = {"credential_id": "a", "spiffe_id": "spiffe://example.org/agent/t",
              "action_class": "c", "target": "t", "issued_at": NOW}
    prod = Selector.build(environment="production", default_environment="production")
    assert prod.matches(**common) and prod.matches(**common, environment="production")
    sand = Selector.build(environment="sandbox", default_environment="production")
    assert not sand.matches(**common) and sand.matches(**common, environment="sandbox")
