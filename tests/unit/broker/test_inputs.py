"""Bounds on caller input: ids, free text, selectors and admin reasons."""

from __future__ import annotations

import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.errors import InvalidRequestError
from broker.grpc.admin import AdminService, selector_from_proto
from broker.wire.inputs import check_id, check_ids, check_length, is_id


def test_ids() -> None:
    assert is_id("apr-0123abcd") and is_id("a.b_c:d-e") and is_id("x" * 128)
    for bad in ("", "x" * 129, "a\nb", "a b", "a/b", "ä", "a\x00"):
        assert not is_id(bad)
    assert check_id("request_id", "") == ""
    with pytest.raises(InvalidRequestError, match="approval_id is required"):
        check_id("approval_id", "", required=True)
    with pytest.raises(InvalidRequestError) as err:
        check_id("approval_id", "a\nforged")
    assert "A-Z a-z 0-9 . _ : -" in str(err.value) and "forged" not in str(err.value)


def test_lengths() -> None:
    assert check_length("reason", "r" * 10, 10) == "r" * 10
    with pytest.raises(InvalidRequestError, match="reason is longer than 10 characters"):
        check_length("reason", "r" * 11, 10)
    with pytest.raises(InvalidRequestError, match="at most 2"):
        check_ids("credential_id", ["a", "b", "c"], limit=2)


@pytest.mark.parametrize(("sel", "words"), [
    (pb.Selector(spiffe_id="spiffe://example.org/" + "a" * 3000), "spiffe_id is longer"),
    (pb.Selector(action_class="a" * 129), "action_class is longer"),
    (pb.Selector(target="t" * 257), "target is longer"),
    (pb.Selector(credential_ids=["ok", "bad\nid"]), "credential_id must be"),
    (pb.Selector(credential_ids=[str(i) for i in range(1001)]), "at most 1000"),
])
def test_selectors_are_bounded(sel: pb.Selector, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        selector_from_proto(sel)


def test_admin_reasons_are_bounded_not_truncated() -> None:
    assert AdminService._reason("  contained  ") == "contained"
    assert AdminService._reason("r" * 1000) == "r" * 1000
    with pytest.raises(InvalidRequestError, match="longer than 1000"):
        AdminService._reason("r" * 1001)
    with pytest.raises(InvalidRequestError, match="required"):
        AdminService._reason("  ")
