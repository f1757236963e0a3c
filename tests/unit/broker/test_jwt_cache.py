"""The verified-JWT-SVID cache: hits only for the same token, peer and bundle, until expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from spiffe import JwtBundle, TrustDomain

from broker.core.spiffeid import SpiffeId
from broker.errors import IdentityError
from broker.grpc.identity import JwtSvidCache, _first_line, verify_jwt_svid
from credbroker_dev.devspiffe import DevCA

NOW = datetime.now(UTC)
CA = DevCA("example.org", now=NOW)
PEER = SpiffeId.parse("spiffe://example.org/agent/a")
BUNDLE = JwtBundle.parse(TrustDomain("example.org"), CA.jwks())


def _bundle(_td: TrustDomain) -> JwtBundle:
    return BUNDLE


def test_hit_until_exp_and_only_for_the_same_peer() -> None:
    start = datetime.now(UTC)  # not import time: the suite may run longer than the TTL
    token = CA.issue_jwt(PEER, ["credbroker"], now=start, ttl=timedelta(seconds=30))
    cache = JwtSvidCache()
    now = start.timestamp()
    jti = cache.verify(token, peer=PEER, audience="credbroker", bundle_for=_bundle, now=now)
    assert jti and cache.verify(token, peer=PEER, audience="credbroker", bundle_for=_bundle,
                                now=now + 1) == jti
    with pytest.raises(IdentityError, match="not the mTLS peer"):
        cache.verify(token, peer=SpiffeId.parse("spiffe://example.org/agent/b"),
                     audience="credbroker", bundle_for=_bundle, now=now + 1)



def test_expired_tokens_are_not_served_from_the_cache() -> None:
    start = datetime.now(UTC)
    token = CA.issue_jwt(PEER, ["credbroker"], now=start, ttl=timedelta(seconds=1))
    cache = JwtSvidCache()
    cache.verify(token, peer=PEER, audience="credbroker", bundle_for=_bundle,
                 now=start.timestamp())
    time.sleep(2.1)  # pyjwt checks exp against the real clock, in whole seconds
    with pytest.raises(IdentityError):
        cache.verify(token, peer=PEER, audience="credbroker", bundle_for=_bundle,
                     now=time.time())


def test_a_new_bundle_invalidates_entries() -> None:
    start = datetime.now(UTC)
    token = CA.issue_jwt(PEER, ["credbroker"], now=start, ttl=timedelta(minutes=5))
    cache = JwtSvidCache()
    cache.verify(token, peer=PEER, audience="credbroker", bundle_for=_bundle,
                 now=start.timestamp())
    other = JwtBundle.parse(TrustDomain("example.org"),
                            DevCA("example.org", now=NOW).jwks())
    with pytest.raises(IdentityError):
        cache.verify(token, peer=PEER, audience="credbroker", bundle_for=lambda _td: other,
                     now=start.timestamp())


# --- verify_jwt_svid: JWT-SVID spec §3 (aud, sub) against the peer's own trust domain --------


def _only_ours(td: TrustDomain) -> JwtBundle | None:
    return BUNDLE if td == TrustDomain("example.org") else None


def test_jwt_svid_3_validated_against_the_bundle_of_the_peers_trust_domain() -> None:
    token = CA.issue_jwt(PEER, ["credbroker"], now=datetime.now(UTC), ttl=timedelta(minutes=5))
    assert verify_jwt_svid(token, peer=PEER, audience="credbroker", bundle_for=_only_ours)
    with pytest.raises(IdentityError) as err:
        verify_jwt_svid(token, peer=PEER, audience="credbroker", bundle_for=lambda _td: None)
    assert str(err.value) == "no JWT bundle for trust domain 'example.org'"


def test_jwt_svid_3_a_refusal_says_why_on_one_line() -> None:
    with pytest.raises(IdentityError) as err:
        verify_jwt_svid("garbage", peer=PEER, audience="credbroker", bundle_for=_only_ours)
    assert str(err.value) == "the JWT-SVID was refused: Not enough segments"


def test_jwt_svid_3_the_audience_must_be_exactly_ours() -> None:
    token = CA.issue_jwt(PEER, ["credbroker", "other"], now=datetime.now(UTC),
                         ttl=timedelta(minutes=5))
    with pytest.raises(IdentityError) as err:
        verify_jwt_svid(token, peer=PEER, audience="credbroker", bundle_for=_only_ours)
    assert str(err.value) == ("the JWT-SVID's audience must be exactly ['credbroker'], "
                              "not ['credbroker', 'other']")


def test_jwt_svid_3_the_subject_must_be_the_mtls_peer() -> None:
    token = CA.issue_jwt(PEER, ["credbroker"], now=datetime.now(UTC), ttl=timedelta(minutes=5))
    with pytest.raises(IdentityError) as err:
        verify_jwt_svid(token, peer=SpiffeId.parse("spiffe://example.org/agent/b"),
                        audience="credbroker", bundle_for=_only_ours)
    assert str(err.value) == (
        "the JWT-SVID's subject spiffe://example.org/agent/a is not the mTLS peer "
        "spiffe://example.org/agent/b; present a JWT-SVID of the same workload")


@pytest.mark.parametrize(("exc", "line"), [
    (ValueError("bad\n  token\tformat"), "bad token format"),  # one line, single spaces
    (ValueError("x" * 300), "x" * 200),                       # at most 200 characters
    (ValueError(""), "ValueError"),                            # no text: the error's type
])
def test_a_py_spiffe_error_is_shown_as_one_short_line(exc: Exception, line: str) -> None:
    assert _first_line(exc) == line
