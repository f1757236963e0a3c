"""Freezes and mass-revocation selectors, unit by unit: which live credentials a
selector picks (each criterion, its boundaries, and their combination), what it
refuses to build, how it describes itself in the audit log, and freeze matching."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.core.revocation import Freeze, Selector, first_freeze, freeze_target, parse_when
from broker.core.spiffeid import SpiffeId
from broker.errors import InvalidRequestError

T0 = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"
CRED = {"credential_id": "c1", "spiffe_id": TRIAGE, "action_class": "enrichment",
        "target": "Host-7", "issued_at": T0}


def picks(sel: Selector, **changes: object) -> bool:
    return sel.matches(**{**CRED, **changes})  # type: ignore[arg-type]


def test_each_criterion_narrows_and_all_must_hold() -> None:
    assert picks(Selector.build(all=True), spiffe_id="junk")
    assert picks(Selector.build(credential_ids=["c1", "c9"]))
    assert not picks(Selector.build(credential_ids=["c9"]))
    assert picks(Selector.build(spiffe_id="spiffe://example.org/agent/*"))
    assert not picks(Selector.build(spiffe_id="spiffe://example.org/agent/c*"))
    assert not picks(Selector.build(spiffe_id="spiffe://example.org/agent/*"), spiffe_id="junk")
    assert picks(Selector.build(action_class="enrichment"))
    assert not picks(Selector.build(action_class="enrichment"), action_class="containment")
    assert picks(Selector.build(target="Host-?"))
    assert not picks(Selector.build(target="host-*"))  # case matters
    assert not picks(Selector.build(target="Host-7x"))
    both = Selector.build(action_class="enrichment", target="Host-*")
    assert picks(both) and not picks(both, target="db-1") and not picks(both, action_class="x")


def test_the_time_window_includes_both_ends() -> None:
    sel = Selector.build(since=T0, until=T0 + timedelta(minutes=5))
    assert picks(sel) and picks(sel, issued_at=T0 + timedelta(minutes=5))
    assert not picks(sel, issued_at=T0 - timedelta(microseconds=1))
    assert not picks(sel, issued_at=T0 + timedelta(minutes=5, microseconds=1))
    assert picks(Selector.build(since=T0), issued_at=T0 + timedelta(days=9))
    assert picks(Selector.build(until=T0), issued_at=T0 - timedelta(days=9))
    assert picks(Selector.build(since=T0, until=T0))


def test_build_keeps_what_it_was_given_and_drops_empty_ids() -> None:
    sel = Selector.build(spiffe_id=TRIAGE, action_class="a", target="t", since=T0,
                         until=T0, credential_ids=["", "c1"])
    assert (str(sel.spiffe_id), sel.action_class, sel.target, sel.since, sel.until,
            sel.credential_ids, sel.all) == (TRIAGE, "a", "t", T0, T0, frozenset({"c1"}), False)
    assert Selector.build(all=True).all is True
    with pytest.raises(InvalidRequestError, match="no selector given"):
        Selector.build(credential_ids=[""])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "no selector given: name --spiffe-id, --action-class, --target, --environment, "
         "--since/--until or --credential-id, or pass --all to select every live credential"),
    ({"all": True, "environment": "sandbox"}, "--all cannot be combined with other selectors"),
    ({"all": True, "target": "x"}, "--all cannot be combined with other selectors"),
    ({"all": True, "since": T0}, "--all cannot be combined with other selectors"),
    ({"all": True, "until": T0}, "--all cannot be combined with other selectors"),
    ({"all": True, "credential_ids": ["c"]}, "--all cannot be combined with other selectors"),
    ({"all": True, "spiffe_id": TRIAGE}, "--all cannot be combined with other selectors"),
    ({"all": True, "action_class": "a"}, "--all cannot be combined with other selectors"),
    ({"since": T0 + timedelta(seconds=1), "until": T0},
     "--since is after --until: nothing could match"),
    ({"spiffe_id": "spiffe://example.org/a/**/b"},
     "SPIFFE ID pattern 'spiffe://example.org/a/**/b': '**' is only allowed as the whole last "
     "segment (e.g. spiffe://example.org/ns/soc/**)"),
])
def test_build_refuses_with_one_line_saying_why(kwargs: dict[str, object], message: str
                                                ) -> None:
    with pytest.raises(InvalidRequestError) as err:
        Selector.build(**kwargs)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_describe_names_every_criterion_for_the_audit_log() -> None:
    assert Selector.build(all=True).describe() == "all"
    sel = Selector.build(spiffe_id=TRIAGE, action_class="a", target="h*", since=T0,
                         until=T0 + timedelta(hours=1), credential_ids=["c2", "c1"])
    assert sel.describe() == (
        f"spiffe_id={TRIAGE} action_class=a target=h* since=2026-11-27T03:00:00+00:00 "
        "until=2026-11-27T04:00:00+00:00 credential_id=c1,c2")
    assert Selector.build(target="x").describe() == "target=x"


def _freeze(kind: str, pattern: str, fid: str = "f1") -> Freeze:
    return Freeze(id=fid, kind=kind, pattern=pattern, reason="compromised", by="alice",
                  created_at=T0)


def test_freezes_match_identities_or_classes_and_describe_themselves() -> None:
    who = SpiffeId.parse(TRIAGE)
    ident = _freeze("spiffe_id", "spiffe://example.org/agent/*")
    cls = _freeze("action_class", "enrichment")
    assert ident.matches(who, "anything") and not ident.matches(
        SpiffeId.parse("spiffe://example.org/ns/x"), "enrichment")
    assert cls.matches(who, "enrichment") and not cls.matches(who, "containment")
    # A class freeze never matches on the identity, even one equal to its pattern text.
    assert not _freeze("action_class", TRIAGE).matches(who, "enrichment")
    assert ident.describe() == ("spiffe://example.org/agent/* was frozen by alice at "
                                "2026-11-27T03:00:00+00:00: compromised")
    assert cls.describe() == ("action class enrichment was frozen by alice at "
                              "2026-11-27T03:00:00+00:00: compromised")
    first, second = _freeze("action_class", "enrichment", "f1"), ident
    assert first_freeze([first, second], who, "enrichment") is first
    assert first_freeze([cls, ident], who, "containment") is ident
    assert first_freeze([cls], who, "containment") is None


def test_freeze_target() -> None:
    assert freeze_target(TRIAGE, "") == ("spiffe_id", TRIAGE)
    assert freeze_target("", "enrichment") == ("action_class", "enrichment")
    for both in (("", ""), (TRIAGE, "enrichment")):
        with pytest.raises(InvalidRequestError) as err:
            freeze_target(*both)
        assert str(err.value) == ("freeze exactly one thing: --spiffe-id PATTERN or "
                                  "--action-class CLASS")
    with pytest.raises(InvalidRequestError) as err:
        freeze_target("spiffe://example.org//x", "")
    assert str(err.value) == (
        "SPIFFE ID pattern 'spiffe://example.org//x' has an empty segment ('//')")


def test_parse_when_names_the_flag_and_the_forms() -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_when("soon", T0, flag="--until")
    assert str(err.value) == (
        "--until 'soon' is not a time; write a duration back from now (30s, 10m, 2h, 1d) or "
        "an RFC 3339 time with a zone (2026-11-27T03:00:00Z, 2026-11-27T04:00:00+01:00)")
    assert parse_when(" 2026-11-27 01:00:00z ", T0, flag="--since") == datetime(
        2026, 11, 27, 1, tzinfo=UTC)
