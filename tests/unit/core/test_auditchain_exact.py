"""The audit chain verdicts, pinned where mutation testing showed the suite was loose:
a checkpoint with the right key id but a bad signature, an empty-log checkpoint, every
field of a failing verdict, and how a line's format is recognised."""

from __future__ import annotations

import pytest

from broker.core.auditchain import (
    CHAIN_OPENED,
    GENESIS,
    Checkpoint,
    canonical,
    chain_hash,
    check_witnesses,
    decode_line,
    encode_line,
    key_id,
    line_format,
    object_format,
    sign_checkpoint,
    verify_chain,
)
from tests.unit.core.test_auditchain import KEY, build, cp


def test_a_checkpoint_from_the_right_key_with_a_forged_signature_is_refused_as_such() -> None:
    lines, heads = build(3)
    good = cp(heads, 3)
    forged = Checkpoint(**{**good.to_json(), "size": 2, "head": heads[1].hex()})
    assert forged.key_id == key_id(KEY.public_key())
    v = verify_chain(lines, [forged], KEY.public_key())
    assert v.ok is False and "is not validly signed by the given key" in v.problem
    assert (v.records, v.head) == (3, heads[2].hex())


def test_a_checkpoint_of_the_empty_log_holds_for_any_later_log() -> None:
    lines, _ = build(3)
    empty = sign_checkpoint(KEY, origin="test", size=0, head=GENESIS, time="t0")
    v = verify_chain(lines, [empty], KEY.public_key())
    assert v.ok is True and v.checkpoints_checked == 1


def test_failing_verdicts_say_how_far_the_log_is_good() -> None:
    lines, heads = build(5)
    v = verify_chain([*lines[:2], b"garbage\n", *lines[3:]])
    assert (v.ok, v.records, v.bad_record, v.head) == (False, 2, 3, heads[1].hex())
    v = verify_chain(lines[:3], [cp(heads, 5)], KEY.public_key())
    assert (v.ok, v.records, v.bad_record, v.head) == (False, 3, 4, heads[2].hex())
    prev, other = GENESIS, []
    for i in range(1, 4):  # a whole chain recomputed over edited records
        body = canonical({"seq": i, "type": "decision", "edited": True})
        prev = chain_hash(prev, body)
        other.append(encode_line(body, prev))
    v = verify_chain(other, [cp(heads, 2)], KEY.public_key())
    assert (v.ok, v.records, v.head) == (False, 3, prev.hex())
    assert v.problem.endswith("the chain was rewritten")
    v = verify_chain(lines, [cp(heads, 3)], KEY.public_key(), signed_to_end=True)
    assert (v.ok, v.records, v.bad_record, v.head, v.checkpoints_checked) == (
        False, 5, 4, heads[4].hex(), 1)
    assert v.problem.startswith("records 4..5 are covered by no signature: the broker signs "
                                "every batch it acknowledges, so they were appended by someone")


def test_a_byte_after_the_record_makes_the_line_malformed() -> None:
    lines, _ = build(1)
    with pytest.raises(ValueError):
        decode_line(lines[0].rstrip(b"\n") + b"X\n")
    with pytest.raises(ValueError, match=r"^the stored hash is not hex$"):
        decode_line(b'{"hash":"' + b"z" * 64 + lines[0][len(b'{"hash":"') + 64:])


def test_canonical_form_keeps_non_ascii_as_utf8() -> None:
    assert canonical({"who": "Zoë"}) == '{"who":"Zoë"}'.encode()


def test_key_id_is_sixteen_hex_digits() -> None:
    kid = key_id(KEY.public_key())
    assert len(kid) == 16 and int(kid, 16) >= 0


@pytest.mark.parametrize(("obj", "fmt"), [
    ([], "unknown"),
    ({"class_uid": 1, "metadata": {}}, "ocsf"),
    ({"signature": "s", "size": 1}, "checkpoints"),
    ({"signature": "s", "type": "x"}, "jsonl"),
    ({"size": 1}, "unknown"),
    ({"type": 3}, "unknown"),
])
def test_object_format(obj: object, fmt: str) -> None:
    assert object_format(obj) == fmt


def test_line_format() -> None:
    lines, _ = build(1)
    assert line_format(lines[0]) == "log"
    assert line_format(b"not json\n") == "unknown"
    assert line_format(b'{"type":"decision"}\n') == "jsonl"


def test_the_problems_name_the_tampering() -> None:
    lines, heads = build(5)
    v = verify_chain([*lines[:1], *lines[2:]])  # record 2 deleted
    assert (v.ok, v.records, v.bad_record) == (False, 1, 2)
    assert v.problem == ("record 2 does not match the chain: its content or position changed: "
                         "record 2 was edited, or a record at or before it was inserted, "
                         "deleted or moved")
    v = verify_chain([*lines[:2], lines[0], *lines[2:]])  # a chain restarted in the middle
    assert v.problem == ("record 3 does not match the chain: it was the first record of a "
                         "chain: records before it were inserted")
    v = verify_chain(lines, [cp(heads, 5)], None)
    assert v.ok is False and v.problem == ("checkpoints given but no public key to check their "
                                           "signatures (pass --public-key)")


def test_a_malformed_checkpoint_names_the_field() -> None:
    with pytest.raises(ValueError) as err:
        Checkpoint.from_json({"origin": "x"})
    assert str(err.value) == "a checkpoint field is missing or malformed: 'size'"


def test_checkpoints_without_a_key_say_how_far_the_log_is_good() -> None:
    lines, heads = build(3)
    v = verify_chain(lines, [cp(heads, 3)], None)
    assert (v.ok, v.records, v.head) == (False, 3, heads[2].hex())
    assert v.problem == ("checkpoints given but no public key to check their signatures "
                         "(pass --public-key)")


def test_a_chain_opened_before_witnesses_does_not_stop_the_others_being_checked() -> None:
    # Chains are checked in name order; "a" opened without witnessing (an older broker),
    # "b" saw chain "c" with two records, and "c" is gone.
    first = {"a": {"type": "broker.started"},
             "b": {"type": CHAIN_OPENED, "chains": {"c": {"size": 2, "head": "ff"}}}}
    assert check_witnesses(first, {"a": ["aa"], "b": ["bb"]}) == [
        "chain c is missing: chain b saw it with 2 record(s) when it opened; it was deleted "
        "from the database"]
    first["a"] = {"type": CHAIN_OPENED, "chains": "not a mapping"}
    assert len(check_witnesses(first, {"a": ["aa"], "b": ["bb"]})) == 1
