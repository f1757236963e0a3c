"""The sidecar's cache rule (more than 20% of life left) and request-body validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sidecar.app import BadRequest, parse_issue_body
from sidecar.cache import CachedCredential, CredentialCache

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _entry(cid: str = "acc1", life: int = 100) -> CachedCredential:
    return CachedCredential(credential_id=cid, issued_at=T0,
                            expires_at=T0 + timedelta(seconds=life), body={"token": "x"})


def test_cached_only_while_more_than_20_percent_of_life_is_left() -> None:
    cache = CredentialCache()
    cache.put("enrichment", "", _entry())
    assert cache.get("enrichment", "", T0 + timedelta(seconds=79)) is not None
    assert cache.get("enrichment", "", T0 + timedelta(seconds=80)) is None  # exactly 20% left
    assert len(cache) == 0  # the stale entry was dropped


def test_keyed_by_class_and_target() -> None:
    cache = CredentialCache()
    cache.put("enrichment", "h1", _entry("a"))
    assert cache.get("enrichment", "h2", T0) is None
    assert cache.get("containment.isolate_host", "h1", T0) is None
    entry = cache.get("enrichment", "h1", T0)
    assert entry is not None and entry.credential_id == "a"


def test_drop_by_credential_id() -> None:
    cache = CredentialCache()
    cache.put("a", "", _entry("one"))
    cache.put("b", "", _entry("two"))
    assert cache.drop("one") and not cache.drop("one")
    assert cache.get("a", "", T0) is None and cache.get("b", "", T0) is not None


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
