"""What a scope map's ``when`` condition sees: every request and identity field under its
documented name, an absent initiating event as empty strings, and the errors' wording."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.core.conditions import Condition, ConditionError
from broker.core.models import CredentialRequest, InitiatingEvent
from broker.core.spiffeid import SpiffeId

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
WHO = SpiffeId.parse("spiffe://example.org/agent/triage")
REQ = CredentialRequest(action_class="enrichment", target="ws-1", justification="why",
                        ttl_seconds=120,
                        initiating_event=InitiatingEvent(source="splunk", id="N-1",
                                                         summary="beacon"))
BARE = CredentialRequest(action_class="enrichment", target="ws-1", justification="why",
                         ttl_seconds=120, initiating_event=None)


@pytest.mark.parametrize("text", [
    'request.action_class == "enrichment"',
    'request.target == "ws-1"',
    'request.justification == "why"',
    "request.ttl_seconds == 120",
    "request.has_initiating_event",
    'request.initiating_event.source == "splunk"',
    'request.initiating_event.id == "N-1"',
    'request.initiating_event.summary == "beacon"',
    'identity.spiffe_id == "spiffe://example.org/agent/triage"',
    'identity.trust_domain == "example.org"',
    'identity.path == "/agent/triage"',
    'identity.segments == ["agent", "triage"]',
])
def test_each_field_is_there_under_its_name(text: str) -> None:
    assert Condition.compile(text).evaluate(WHO, REQ, NOW) is True


@pytest.mark.parametrize("text", [
    "!request.has_initiating_event",
    'request.initiating_event.source == ""',
    'request.initiating_event.id == ""',
    'request.initiating_event.summary == ""',
])
def test_no_initiating_event_reads_as_empty(text: str) -> None:
    assert Condition.compile(text).evaluate(WHO, BARE, NOW) is True


def test_errors_say_what_went_wrong() -> None:
    with pytest.raises(ConditionError) as err:
        Condition.compile("request.ttl_seconds / 0 == 1").evaluate(WHO, REQ, NOW)
    assert str(err.value).startswith("failed to evaluate: ")
    assert "XX" not in str(err.value) and "None" not in str(err.value)
    assert str(ConditionError("a", "b")) == "a; b"
