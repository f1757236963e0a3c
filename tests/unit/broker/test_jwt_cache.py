"""The verified-JWT-SVID cache: hits only for the same token, peer and bundle, until expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from spiffe import JwtBundle, TrustDomain

from broker.core.spiffeid import SpiffeId
from broker.errors import IdentityError
from broker.grpc.identity import JwtSvidCache
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
