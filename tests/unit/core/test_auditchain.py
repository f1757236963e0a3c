"""Hash chain and checkpoint verification: every kind of tampering is caught and located."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.core.auditchain import (
    GENESIS,
    Checkpoint,
    canonical,
    chain_hash,
    decode_line,
    encode_line,
    sign_checkpoint,
    verify_chain,
)

KEY = Ed25519PrivateKey.generate()


def build(n: int) -> tuple[list[bytes], list[bytes]]:
    lines, heads, prev = [], [], GENESIS
    for i in range(1, n + 1):
        body = canonical({"seq": i, "type": "decision", "time": f"t{i}", "x": "y" * i})
        prev = chain_hash(prev, body)
        heads.append(prev)
        lines.append(encode_line(body, prev))
    return lines, heads


def cp(heads: list[bytes], size: int, key: Ed25519PrivateKey = KEY) -> Checkpoint:
    return sign_checkpoint(key, origin="test", size=size, head=heads[size - 1],
                           time="2026-11-27T00:00:00Z")


def test_an_intact_log_verifies_with_its_checkpoints() -> None:
    lines, heads = build(10)
    v = verify_chain(lines, [cp(heads, 5), cp(heads, 10)], KEY.public_key())
    assert v.ok and v.records == 10 and v.head == heads[-1].hex() and v.checkpoints_checked == 2
    assert verify_chain([]).ok


def test_line_round_trip() -> None:
    lines, heads = build(1)
    digest, body = decode_line(lines[0])
    assert digest == heads[0] and body.startswith(b'{"seq":1')
    for bad in (b"", b"{}", b'{"hash":"zz","record":{}}', lines[0][:-3]):
        with pytest.raises(ValueError):
            decode_line(bad)


@pytest.mark.parametrize(("tamper", "bad"), [
    ("edit", 4),
    ("insert", 4),
    ("delete", 4),
    ("reorder", 4),
    ("garbage", 4),
    ("edit-first", 1),
])
def test_single_record_tampering_is_named(tamper: str, bad: int) -> None:
    lines, _ = build(8)
    if tamper == "edit":
        lines[3] = lines[3].replace(b'"type":"decision"', b'"type":"decisioN"')
    elif tamper == "insert":
        lines.insert(3, lines[1])
    elif tamper == "delete":
        del lines[3]
    elif tamper == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    elif tamper == "garbage":
        lines[3] = b"not a record\n"
    elif tamper == "edit-first":
        lines[0] = lines[0].replace(b'"time":"t1"', b'"time":"t0"')
    v = verify_chain(lines)
    assert not v.ok and v.bad_record == bad, v
    assert f"record {bad}" in v.problem


def test_a_recomputed_chain_is_caught_by_the_checkpoint() -> None:
    lines, heads = build(6)
    checkpoint = cp(heads, 6)
    # An attacker edits record 2 and recomputes every hash after it: the chain is consistent...
    forged, prev = [], GENESIS
    for i, line in enumerate(lines):
        _, body = decode_line(line)
        if i == 1:
            body = body.replace(b'"type":"decision"', b'"type":"nothing"')
        prev = chain_hash(prev, body)
        forged.append(encode_line(body, prev))
    assert verify_chain(forged).ok
    # ...but not the one the broker signed.
    v = verify_chain(forged, [checkpoint], KEY.public_key())
    assert not v.ok and "rewritten" in v.problem


def test_truncation_below_a_checkpoint_is_caught() -> None:
    lines, heads = build(9)
    v = verify_chain(lines[:7], [cp(heads, 9)], KEY.public_key())
    assert not v.ok and v.bad_record == 8 and "truncated" in v.problem and "8..9" in v.problem
    assert verify_chain(lines[:7]).ok  # without a checkpoint, a cut tail cannot be seen


def test_checkpoint_signatures_are_checked() -> None:
    lines, heads = build(3)
    other = Ed25519PrivateKey.generate()
    v = verify_chain(lines, [cp(heads, 3, other)], KEY.public_key())
    assert not v.ok and "not validly signed" in v.problem
    forged = cp(heads, 3)
    forged = Checkpoint(**{**forged.to_json(), "size": 2})
    assert not verify_chain(lines, [forged], KEY.public_key()).ok
    v = verify_chain(lines, [cp(heads, 3)], None)
    assert not v.ok and "--public-key" in v.problem


def test_checkpoint_json_round_trip_and_errors() -> None:
    _, heads = build(2)
    c = cp(heads, 2)
    assert Checkpoint.from_json(c.to_json()) == c
    with pytest.raises(ValueError):
        Checkpoint.from_json({"size": 1})
    with pytest.raises(ValueError):
        Checkpoint.from_json([])
