"""The sidecar's cache rule (identical requests only, more than 20% of life left, a requested
TTL must fit, dropped on a new scope map) and request-body validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from sidecar.app import BadRequest, parse_issue, parse_issue_body
from sidecar.cache import CachedCredential, CredentialCache, request_key

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
V1, V2 = "sha256:one", "sha256:two"


def _entry(cid: str = "acc1", life: int = 100, version: str = V1,
           action_class: str = "enrichment") -> CachedCredential:
    return CachedCredential(credential_id=cid, issued_at=T0,
                            expires_at=T0 + timedelta(seconds=life), body={"token": "x"},
                            action_class=action_class, scope_map_version=version)


def _req(**fields: object) -> pb.IssueCredentialRequest:
    base: dict[str, object] = {
        "action_class": "enrichment", "target": "h1", "justification": "enrich the alert",
        "initiating_event": pb.InitiatingEvent(source="splunk", id="N-1", summary="beacon"),
        "ttl_seconds": 0}
    base.update(fields)
    return pb.IssueCredentialRequest(**base)  # type: ignore[arg-type]


def test_cached_only_while_more_than_20_percent_of_life_is_left() -> None:
    cache = CredentialCache()
    cache.put("k", _entry())
    assert cache.get("k", T0 + timedelta(seconds=79)) is not None
    assert cache.get("k", T0 + timedelta(seconds=80)) is None  # exactly 20% left
    assert len(cache) == 0  # the stale entry was dropped


@pytest.mark.parametrize("change", [
    {"action_class": "containment.isolate_host"},
    {"target": "h2"},
    {"target": ""},
    {"justification": "enrich the alert!"},
    {"justification": ""},
    {"initiating_event": pb.InitiatingEvent(source="crowdstrike", id="N-1", summary="beacon")},
    {"initiating_event": pb.InitiatingEvent(source="splunk", id="N-2", summary="beacon")},
    {"initiating_event": pb.InitiatingEvent(source="splunk", id="N-1", summary="other")},
    {"initiating_event": pb.InitiatingEvent(source="splunk", id="N-1")},
    {"initiating_event": None},
    {"ttl_seconds": 60},
    {"ttl_seconds": 3600},
    {"environment": "sandbox"},  # a production credential never answers a sandbox request
])
def test_every_request_field_is_part_of_the_key(change: dict[str, object]) -> None:
    assert request_key(_req(**change)) != request_key(_req())


def test_the_key_is_canonical_and_ignores_what_never_changes_the_decision() -> None:
    assert request_key(_req()) == request_key(_req())
    # Fields do not run into each other: ("ab", "") and ("a", "b") differ.
    assert request_key(_req(target="ab", justification="")) != \
        request_key(_req(target="a", justification="b"))
    # The correlation id the broker assigns is not part of what was asked.
    assert request_key(_req(request_id="r1")) == request_key(_req(request_id="r2"))
    assert len(request_key(_req())) == 64


def test_a_requested_ttl_must_fit_in_what_is_left() -> None:
    cache = CredentialCache()
    cache.put("k", _entry(life=100))
    at = T0 + timedelta(seconds=30)  # 70 s left
    assert cache.get("k", at, 70) is not None
    assert cache.get("k", at, 71) is None
    assert len(cache) == 1  # still good for a request that fits
    assert cache.get("k", at) is not None


def test_a_credential_with_no_life_is_never_fresh_even_when_it_seems_to_end_later() -> None:
    # issued_at == expires_at, seen by a sidecar whose clock is behind the broker's
    cache = CredentialCache()
    cache.put("k", CachedCredential(credential_id="z", issued_at=T0 + timedelta(seconds=10),
                                    expires_at=T0 + timedelta(seconds=10), body={},
                                    action_class="enrichment", scope_map_version=V1))
    assert cache.get("k", T0) is None


def test_a_one_second_credential_is_fresh_in_its_first_800_ms() -> None:
    cache = CredentialCache()
    cache.put("k", _entry(life=1))
    assert cache.get("k", T0) is not None
    assert cache.get("k", T0 + timedelta(milliseconds=790)) is not None
    assert cache.get("k", T0 + timedelta(milliseconds=800)) is None


def test_without_a_requested_ttl_less_than_a_second_left_is_enough() -> None:
    cache = CredentialCache()
    cache.put("k", _entry(life=2))
    at = T0 + timedelta(milliseconds=1500)  # 0.5 s left, more than 20 % of 2 s
    assert cache.get("k", at) is not None
    assert cache.get("k", at, 1) is None


def test_keyed_by_the_whole_request() -> None:
    cache = CredentialCache()
    cache.put(request_key(_req()), _entry("a"))
    assert cache.get(request_key(_req(target="h2")), T0) is None
    assert cache.get(request_key(_req(justification="other")), T0) is None
    entry = cache.get(request_key(_req()), T0)
    assert entry is not None and entry.credential_id == "a"


def test_drop_by_credential_id() -> None:
    cache = CredentialCache()
    cache.put("a", _entry("one"))
    cache.put("b", _entry("two"))
    assert cache.holds("one")
    assert cache.drop("one") and not cache.drop("one")
    assert cache.get("a", T0) is None and cache.get("b", T0) is not None
    assert not cache.holds("one")


def test_drop_class_uses_the_class_the_broker_decided() -> None:
    cache = CredentialCache()
    cache.put("a", _entry("one", action_class="enrichment"))
    cache.put("b", _entry("two", action_class="containment.isolate_host"))
    assert cache.drop_class("enrichment") == 1
    assert not cache.holds("one") and cache.holds("two")


def test_a_new_scope_map_version_drops_what_another_decided() -> None:
    cache = CredentialCache()
    assert cache.set_version("") == 0 and cache.version == ""  # an older broker: no say
    cache.put("a", _entry("one", version=V1))
    cache.put("b", _entry("two", version=V2))
    assert cache.set_version(V1) == 1  # the sync names V1: V2's entry goes
    assert cache.holds("one") and not cache.holds("two")
    assert cache.set_version(V2) == 1
    assert len(cache) == 0
    # A credential decided under the old map (answer in flight during the reload) is
    # not cached once the new one is known.
    assert not cache.put("c", _entry("three", version=V1))
    assert cache.put("d", _entry("four", version=V2))
    assert cache.holds("four") and not cache.holds("three")


def test_zero_length_life_is_never_fresh() -> None:
    assert not _entry(life=0).fresh_at(T0)


def test_body_is_parsed() -> None:
    msg = parse_issue_body(b'{"action_class": "enrichment", "target": "h", "ttl_seconds": 60, '
                           b'"initiating_event": {"source": "s", "id": "1"}, '
                           b'"justification": "j"}')
    assert msg.action_class == "enrichment" and msg.ttl_seconds == 60
    assert msg.initiating_event.id == "1" and msg.HasField("initiating_event")
    assert not parse_issue_body(b'{"action_class": "a"}').HasField("initiating_event")


@pytest.mark.parametrize(("raw", "words"), [
    (b"", "JSON object"),
    (b"{", "not valid JSON"),
    (b"\xff", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"action_class": 5}', "action_class is required"),
    (b'{"action_class": "a", "target": 5}', "target must be a string"),
    (b'{"action_class": "a", "ttl_seconds": true}', "positive integer"),
    (b'{"action_class": "a", "ttl_seconds": -1}', "positive integer"),
    (b'{"action_class": "a", "initiating_event": {"source": "s", "x": 1}}', "initiating_event"),
    (b'{"action_class": "a", "initiating_event": {"source": 1, "id": "x"}}', "must be a string"),
    (b'{"action_class": "a", "extra": 1}', "unknown field(s) extra"),
])
def test_bad_bodies(raw: bytes, words: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_issue_body(raw)
    assert words in str(err.value)


@pytest.mark.parametrize(("raw", "words"), [
    # Deep nesting is refused before json.loads could recurse (30,000 deep once gave a 500).
    (b"[" * 30_000 + b"]" * 30_000, "more than 8 deep"),
    (b'{"action_class": "a", "target": ' + b"[" * 30_000, "more than 8 deep"),
    (b'{"action_class": "a", "initiating_event": ' + b'{"x": ' * 9 + b"1" + b"}" * 10,
     "more than 8 deep"),
    # Lone surrogates: json.loads accepts the escape, protobuf and UTF-8 cannot hold it.
    (b'{"action_class": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"action_class": "a", "justification": "x\\udfffy"}', "lone UTF-16 surrogate"),
    (b'{"action_class": "a", "initiating_event": {"source": "s", "id": "\\udbff"}}',
     "lone UTF-16 surrogate"),
    (b'{"\\ud800": 1}', "lone UTF-16 surrogate"),
    # Bytes that are not UTF-8 (a lone continuation byte, an overlong encoding, CESU-8).
    (b'{"action_class": "\x80"}', "not UTF-8"),
    (b'{"action_class": "\xc0\xaf"}', "not UTF-8"),
    (b'{"action_class": "\xed\xa0\x80"}', "not UTF-8"),
    # Numbers JSON does not have, and integers too long to convert.
    (b'{"action_class": "a", "ttl_seconds": NaN}', "not a JSON number"),
    (b'{"action_class": "a", "ttl_seconds": Infinity}', "not a JSON number"),
    (b'{"action_class": "a", "ttl_seconds": ' + b"9" * 5000 + b"}", "not acceptable JSON"),
    # Non-objects at the top level, wrong types.
    (b'"enrichment"', "JSON object"),
    (b"null", "JSON object"),
    (b"42", "JSON object"),
    (b'{"action_class": ["a"]}', "action_class is required"),
    (b'{"action_class": "a", "wait_seconds": "10"}', "wait_seconds"),
    (b'{"action_class": "a", "approval_id": "apr-1\\nforged"}', "approval_id must be"),
    (b'{"action_class": "a", "approval_id": "' + b"a" * 200 + b'"}', "approval_id must be"),
])
def test_hostile_bodies_are_bad_requests(raw: bytes, words: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_issue(raw)
    assert words in str(err.value)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    msg, wait = parse_issue(b'{"action_class": "a", "justification": "' + b"[{" * 1000 +
                            b'\\"]", "wait_seconds": 5}')
    assert msg.justification.startswith("[{[{") and wait == 5


def test_every_documented_field_of_the_issue_body_reaches_the_request() -> None:
    """POST /v1/credentials: environment and break_glass are carried, not dropped."""
    msg, _ = parse_issue(b'{"action_class": "a", "environment": "prod", "break_glass": true}')
    assert msg.environment == "prod"
    assert msg.break_glass is True


def test_an_approval_answers_with_the_documented_field_names() -> None:
    """The sidecar HTTP API's approval object (openapi.json `ApprovalInfo`)."""
    from sidecar.app import _approval_json

    a = pb.ApprovalInfo(id="ap1", state="pending", action_class="containment",
                        approvers=["spiffe://example.org/h"], approvals_required=1)
    a.expires_at.FromDatetime(T0)
    assert _approval_json(a) == {
        "approval_id": "ap1", "status": "pending", "action_class": "containment",
        "approvers": ["spiffe://example.org/h"], "approvals_required": 1, "approved_by": [],
        "expires_at": "2026-11-27T12:00:00Z"}
