"""Selectors and pattern overlap, pinned where mutation testing showed the suite was loose:
upper-case path segments, wildcard segments with more than one ``*``, a malformed
holder in the registry, and the exact refusals a responder reads."""

from __future__ import annotations

import pytest

from broker.core.revocation import check_known
from broker.core.spiffeid import SpiffeIdPattern
from broker.errors import InvalidRequestError


def _overlap(a: str, b: str) -> bool:
    pa, pb = SpiffeIdPattern.parse(a), SpiffeIdPattern.parse(b)
    assert pa.overlaps(pb) == pb.overlaps(pa)
    return pa.overlaps(pb)


@pytest.mark.parametrize(("a", "b", "overlap"), [
    # SPIFFE path segments may be upper-case: a wildcard must reach them.
    ("spiffe://t/agent/*", "spiffe://t/agent/Triage", True),
    ("spiffe://t/agent/T*", "spiffe://t/agent/TRIAGE", True),
    ("spiffe://t/agent/t*", "spiffe://t/agent/tRIAGE", True),
    # Several '*' in one segment: the suffix is what follows the last one.
    ("spiffe://t/a*b*c", "spiffe://t/*xc", True),     # 'abxc' matches both
    ("spiffe://t/*xc", "spiffe://t/a*b*c", True),
    ("spiffe://t/a*b*c", "spiffe://t/*xd", False),
])
def test_overlap_of_case_and_multi_wildcard_segments(a: str, b: str, overlap: bool) -> None:
    assert _overlap(a, b) is overlap


def test_a_malformed_holder_in_the_registry_does_not_hide_the_valid_ones() -> None:
    held = [("not a spiffe id", "enrichment"), ("spiffe://example.org/retired/x", "enrichment")]
    check_known(spiffe_id="spiffe://example.org/retired/*", classes=["enrichment"],
                workloads=[], held=held)


def test_the_refusals_a_responder_reads() -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_known(action_class="x", classes=[], workloads=[], held=[])
    assert str(err.value) == "action class 'x' is not in the scope map; known: none"
    with pytest.raises(InvalidRequestError) as err:
        check_known(spiffe_id="spiffe://example.org/a", classes=[], workloads=[], held=[])
    assert str(err.value) == (
        "spiffe://example.org/a matches no workload named in the scope map (nor any holder "
        "of a live credential); workloads named there: none")
    two = [SpiffeIdPattern.parse("spiffe://example.org/z"),
           SpiffeIdPattern.parse("spiffe://example.org/b")]
    with pytest.raises(InvalidRequestError) as err:
        check_known(spiffe_id="spiffe://example.org/a", classes=[], workloads=two, held=[])
    assert str(err.value).endswith(
        "workloads named there: spiffe://example.org/b, spiffe://example.org/z")
    with pytest.raises(InvalidRequestError) as err:
        check_known(spiffe_id="spiffe://Example.org/a", classes=[], workloads=[], held=[])
    assert str(err.value) == (
        "SPIFFE ID pattern 'spiffe://Example.org/a': trust domain 'Example.org' may only "
        "contain a-z, 0-9, '.', '-' and '_' (it must be lower-case)")


@pytest.mark.parametrize("pattern", [
    "spiffe://t/agent/*", "spiffe://t/agent/T*", "spiffe://t/**",
])
def test_wildcards_match_upper_case_identities(pattern: str) -> None:
    """A freeze of agent/* must stop agent/Triage too."""
    from broker.core.spiffeid import SpiffeId
    assert SpiffeIdPattern.parse(pattern).matches(SpiffeId.parse("spiffe://t/agent/Triage"))


def test_an_invalid_spiffe_id_is_named_as_one() -> None:
    from broker.core.spiffeid import SpiffeId
    from broker.errors import InvalidSpiffeIdError
    with pytest.raises(InvalidSpiffeIdError) as err:
        SpiffeId.parse("spiffe://t/a*")
    assert str(err.value).startswith("SPIFFE ID 'spiffe://t/a*': path segment 'a*' may only")
