"""The verified-JWT-SVID cache: hits only for the same token, peer and bundle, until expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
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


def test_a_hit_needs_the_same_audience_too() -> None:
    """JWT-SVID §3: the audience was part of what was verified; another audience is a miss
    (and so refused), not an answer from the cache."""
    token = CA.issue_jwt(PEER, ["credbroker"], now=datetime.now(UTC), ttl=timedelta(minutes=5))
    cache = JwtSvidCache()
    now = time.time()
    assert cache.verify(token, peer=PEER, audience="credbroker", bundle_for=_only_ours, now=now)
    with pytest.raises(IdentityError, match=r"(?i)audience"):
        cache.verify(token, peer=PEER, audience="other", bundle_for=_only_ours, now=now + 1)


def test_which_entries_the_cache_answers_from() -> None:
    """Hits, lifetimes and eviction, told apart from re-verification: every token here
    expires (by the real clock py-spiffe reads) before the questions, so an answer comes
    from the cache and a miss is refused. The cache's own clock is the ``now`` passed in,
    far before the tokens' exp, so ``max_age`` bounds each entry."""
    exp = int(time.time()) + 2
    s = time.time() - 1000.0

    def token() -> str:
        return CA.issue_jwt(PEER, ["credbroker"], now=datetime.fromtimestamp(exp - 2, UTC),
                            ttl=timedelta(seconds=2))

    def ask(cache: JwtSvidCache, t: str, at: float,
            peer: SpiffeId = PEER) -> str | None:
        try:
            return cache.verify(t, peer=peer, audience="credbroker", bundle_for=_only_ours,
                                now=s + at)
        except IdentityError:
            return None

    # a default cache: entries live 60 s of the caller's clock, keyed by the token
    plain = JwtSvidCache()
    t1, t2 = token(), token()
    j1, j2 = ask(plain, t1, 0), ask(plain, t2, 0)
    assert j1 and j2 and j1 != j2
    # max_entries=2, entries live 5 s
    ageing = JwtSvidCache(max_entries=2, max_age=5)
    a1, a2, a3 = token(), token(), token()
    ja1, ja2 = ask(ageing, a1, 0), ask(ageing, a2, 3)
    ja3 = ask(ageing, a3, 5)  # full: a1 (until 5) has lapsed at 5 and makes room
    full = JwtSvidCache(max_entries=2, max_age=5)
    f1, f2, f3 = token(), token(), token()
    ask(full, f1, 0), ask(full, f2, 0)
    jf3 = ask(full, f3, 1)  # full of live entries: all are dropped
    assert ja1 and ja2 and ja3 and jf3

    while time.time() <= exp + 1:  # let every token expire by the real clock
        time.sleep(0.2)
    assert ask(plain, t1, 59.9) == j1 and ask(plain, t2, 59.9) == j2  # per token
    assert ask(plain, t1, 60) is None                                   # max_age, exclusive
    assert ask(plain, t2, 1, peer=SpiffeId.parse("spiffe://example.org/agent/b")) is None
    assert ask(ageing, a2, 5) == ja2 and ask(ageing, a3, 5) == ja3
    assert ask(ageing, a1, 4) is None                                   # evicted as lapsed
    assert ask(full, f3, 1) == jf3
    assert ask(full, f1, 1) is None and ask(full, f2, 1) is None       # cleared when full


def test_the_jti_is_returned_and_a_token_without_one_yields_empty() -> None:
    """The jti (JWT-SVID §3 leaves it optional) goes to the audit record as is."""
    token = CA.issue_jwt(PEER, ["credbroker"], now=datetime.now(UTC), ttl=timedelta(minutes=5))
    assert verify_jwt_svid(token, peer=PEER, audience="credbroker", bundle_for=_only_ours) == \
        jwt.decode(token, options={"verify_signature": False})["jti"]
    key = ec.generate_private_key(ec.SECP256R1())
    bundle = JwtBundle(TrustDomain("example.org"), {"k1": key.public_key()})
    bare = jwt.encode({"sub": str(PEER), "aud": ["credbroker"],
                       "exp": int(time.time()) + 300}, key, algorithm="ES256",
                      headers={"kid": "k1", "typ": "JWT"})
    assert verify_jwt_svid(bare, peer=PEER, audience="credbroker",
                           bundle_for=lambda _td: bundle) == ""
