"""SPIFFE ID validation (SPIFFE-ID spec §2) and segment-safe pattern matching."""

from __future__ import annotations

import pytest

from broker.core.spiffeid import SpiffeId, SpiffeIdPattern
from broker.errors import InvalidSpiffeIdError


@pytest.mark.parametrize("value", [
    "spiffe://example.org",
    "spiffe://example.org/agent/triage",
    "spiffe://ex-ample_1.org/A.b-c_D/9",
    "spiffe://example.org/" + "a" * 200,
])
def test_valid_ids(value: str) -> None:
    assert str(SpiffeId.parse(value)) == value


@pytest.mark.parametrize(("value", "words"), [
    ("", "empty"),
    ("https://example.org/a", "must start with 'spiffe://'"),
    ("SPIFFE://example.org/a", "lower-case"),
    ("spiffe://", "empty trust domain"),
    ("spiffe:///a", "empty trust domain"),
    ("spiffe://Example.org/a", "lower-case"),
    ("spiffe://exa mple.org/a", "may only contain"),
    ("spiffe://user@example.org/a", "user info"),
    ("spiffe://example.org:8443/a", "port"),
    ("spiffe://example.org/a/../b", "'..' segment"),
    ("spiffe://example.org/a/./b", "'.' segment"),
    ("spiffe://example.org/a%2Fb", "percent-encoding"),
    ("spiffe://example.org/a?x=1", "query"),
    ("spiffe://example.org/a#f", "fragment"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/a/", "trailing '/'"),
    ("spiffe://example.org/a/b c", "may only contain"),
    ("spiffe://example.org/a*", "may only contain"),
    ("spiffe://example.org/" + "a" * 2050, "longer than 2048"),
])
def test_invalid_ids_say_why(value: str, words: str) -> None:
    with pytest.raises(InvalidSpiffeIdError, match=None) as err:
        SpiffeId.parse(value)
    assert words in str(err.value)


@pytest.mark.parametrize(("pattern", "matching", "not_matching"), [
    ("spiffe://example.org/agent/triage",
     ["spiffe://example.org/agent/triage"],
     ["spiffe://example.org/agent/triage/x", "spiffe://example.org/agent/triag",
      "spiffe://other.org/agent/triage"]),
    ("spiffe://example.org/agent/*",
     ["spiffe://example.org/agent/triage", "spiffe://example.org/agent/x"],
     ["spiffe://example.org/agent", "spiffe://example.org/agent/a/b",
      "spiffe://example.org/agents/a", "spiffe://example.org.evil/agent/a",
      "spiffe://evil.org/agent/a"]),
    ("spiffe://example.org/agent/triage-*",
     ["spiffe://example.org/agent/triage-eu", "spiffe://example.org/agent/triage-"],
     ["spiffe://example.org/agent/triage", "spiffe://example.org/agent/triage-eu/x"]),
    ("spiffe://example.org/ns/*/sa/agent",
     ["spiffe://example.org/ns/soc/sa/agent"],
     ["spiffe://example.org/ns/soc/x/sa/agent", "spiffe://example.org/ns/sa/agent"]),
    ("spiffe://example.org/ns/soc/**",
     ["spiffe://example.org/ns/soc/a", "spiffe://example.org/ns/soc/a/b/c"],
     ["spiffe://example.org/ns/soc", "spiffe://example.org/ns/socx/a",
      "spiffe://example.org/ns/other/a"]),
    ("spiffe://example.org/a.b/*",
     ["spiffe://example.org/a.b/x"],
     ["spiffe://example.org/aXb/x"]),  # '.' is literal, not a regex wildcard
])
def test_patterns_are_segment_safe(pattern: str, matching: list[str],
                                   not_matching: list[str]) -> None:
    p = SpiffeIdPattern.parse(pattern)
    for value in matching:
        assert p.matches(SpiffeId.parse(value)), value
    for value in not_matching:
        assert not p.matches(SpiffeId.parse(value)), value


@pytest.mark.parametrize(("pattern", "words"), [
    ("spiffe://*.example.org/a", "not allowed in the trust domain"),
    ("spiffe://example.org/**/a", "'**' is only allowed as the whole last segment"),
    ("spiffe://example.org/a**", "'**' is only allowed"),
    ("spiffe://example.org/a/../*", "'..' segment"),
    ("spiffe://example.org/a%2f/*", "percent-encoding"),
    ("spiffe://EXAMPLE.org/*", "lower-case"),
    ("spiffe://example.org/a//*", "empty segment"),
])
def test_malformed_patterns_are_refused(pattern: str, words: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as err:
        SpiffeIdPattern.parse(pattern)
    assert words in str(err.value)
