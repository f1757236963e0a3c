"""The audit log's hash chain and signed checkpoints (pure: bytes in, verdicts out).

Each line of the log is ``{"hash":"<64 hex>","record":<canonical JSON>}``. The
hash of record *n* is

    SHA-256("credbroker/audit/v1\\x00" || hash(n-1) || canonical JSON of record n)

with 32 zero bytes before the first record: the domain prefix keeps these
hashes from being confused with any other SHA-256 use (cf. RFC 6962 §2.1's
leaf/node prefixes), and each record commits to every record before it. So
editing, inserting, deleting or reordering any record breaks the chain at that
record. Chain verification needs no JSON parsing (the record bytes are hashed
as stored), which is what makes it fast.

A chain alone cannot show that its tail was cut off, or that the whole chain
was recomputed after an edit. Checkpoints close that gap: the broker signs
(origin, size, head hash, time) with Ed25519 (cf. C2SP tlog-checkpoint) and
writes them beside the log and, optionally, to a second location. Verification
against a checkpoint proves that the first ``size`` records are exactly those
the broker signed.

A Merkle tree (RFC 6962) would add compact inclusion and consistency proofs;
with one writer and auditors who read the whole log, the chain plus signed
checkpoints gives the same tamper evidence with less machinery.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DOMAIN = b"credbroker/audit/v1\x00"
CHECKPOINT_DOMAIN = b"credbroker/audit-checkpoint/v1\n"
GENESIS = bytes(32)
_PREFIX = b'{"hash":"'
_MIDDLE = b'","record":'
_HEX_LEN = 64
_BODY_START = len(_PREFIX) + _HEX_LEN + len(_MIDDLE)


def canonical(record: dict[str, Any]) -> bytes:
    """The one serialisation of a record that gets hashed."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def chain_hash(prev: bytes, body: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + prev + body).digest()


def encode_line(body: bytes, digest: bytes) -> bytes:
    return _PREFIX + digest.hex().encode() + _MIDDLE + body + b"}\n"


def line_of(stored_hash: str, body: bytes) -> bytes:
    """The log line of a record kept elsewhere (a database row: its stored hash as text and
    its record bytes), so the one verification reads it. Not checked here: a hash that is
    not 64 hex digits makes a line :func:`verify_chain` reports as malformed."""
    return _PREFIX + stored_hash.encode() + _MIDDLE + body + b"}\n"


def decode_line(line: bytes) -> tuple[bytes, bytes]:
    """(stored hash, record bytes) of one log line.

    Raises:
        ValueError: the line is not in the log's format.
    """
    line = line.rstrip(b"\n")
    if (not line.startswith(_PREFIX) or line[len(_PREFIX) + _HEX_LEN:_BODY_START] != _MIDDLE
            or not line.endswith(b"}") or len(line) <= _BODY_START + 1):
        raise ValueError("not an audit record line")
    try:
        digest = bytes.fromhex(line[len(_PREFIX):len(_PREFIX) + _HEX_LEN].decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the stored hash is not hex") from None
    return digest, line[_BODY_START:-1]


#: What each recognised line format is, for telling a person what they passed.
FORMAT_NAMES = {
    "log": "the audit log the broker writes",
    "jsonl": "a JSONL export (`credbroker audit export --format jsonl`)",
    "ocsf": "an OCSF export (`credbroker audit export --format ocsf`)",
    "checkpoints": "a file of signed checkpoints",
    "unknown": "not a credbroker audit file",
}


def line_format(line: bytes) -> str:
    """Which credbroker file a line comes from: log, jsonl, ocsf, checkpoints or unknown."""
    try:
        decode_line(line)
        return "log"
    except ValueError:
        pass
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "unknown"
    return object_format(obj)


def object_format(obj: Any) -> str:
    """jsonl (an exported record), ocsf, checkpoints or unknown, for a parsed line."""
    if not isinstance(obj, dict):
        return "unknown"
    if "class_uid" in obj and "metadata" in obj:
        return "ocsf"
    if "signature" in obj and "size" in obj:
        return "checkpoints"
    if isinstance(obj.get("type"), str):
        return "jsonl"
    return "unknown"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    origin: str
    size: int
    head: str  # hex
    time: str  # RFC 3339
    key_id: str
    signature: str  # base64

    def body(self) -> bytes:
        return checkpoint_body(self.origin, self.size, self.head, self.time)

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "size": self.size, "head": self.head, "time": self.time,
                "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_json(cls, obj: Any) -> Checkpoint:
        """Raises: ValueError when a field is missing or of the wrong type."""
        if not isinstance(obj, dict):
            raise ValueError("a checkpoint must be a JSON object")
        try:
            return cls(origin=str(obj["origin"]), size=int(obj["size"]), head=str(obj["head"]),
                       time=str(obj["time"]), key_id=str(obj["key_id"]),
                       signature=str(obj["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a checkpoint field is missing or malformed: {exc}") from None


def checkpoint_body(origin: str, size: int, head: str, time: str) -> bytes:
    return CHECKPOINT_DOMAIN + f"{origin}\n{size}\n{head}\n{time}\n".encode()


def sign_checkpoint(key: Ed25519PrivateKey, *, origin: str, size: int, head: bytes,
                    time: str) -> Checkpoint:
    body = checkpoint_body(origin, size, head.hex(), time)
    return Checkpoint(origin=origin, size=size, head=head.hex(), time=time,
                      key_id=key_id(key.public_key()),
                      signature=base64.b64encode(key.sign(body)).decode())


def checkpoint_signed_by(cp: Checkpoint, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(base64.b64decode(cp.signature), cp.body())
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    ok: bool
    records: int
    head: str
    problem: str = ""
    bad_record: int | None = None  # 1-based line number of the first bad record
    checkpoints_checked: int = 0


def verify_chain(lines: Iterable[bytes], checkpoints: Iterable[Checkpoint] = (),
                 public_key: Ed25519PublicKey | None = None, *,
                 signed_to_end: bool = False) -> Verdict:
    """Check every record of the log, then the log against each signed checkpoint.

    With ``signed_to_end`` (the broker signs every durable batch: the log has a head
    checkpoint), records after the newest checkpoint were never acknowledged by the
    broker: they fail verification as appended by someone else.
    """
    prev = GENESIS
    heads: list[bytes] = []
    n = 0
    for n, line in enumerate(lines, 1):
        try:
            stored, body = decode_line(line)
        except ValueError as exc:
            return Verdict(ok=False, records=n - 1, head=prev.hex(), bad_record=n,
                           problem=f"record {n} is malformed ({exc}): the line was edited")
        computed = chain_hash(prev, body)
        if computed != stored:
            if chain_hash(GENESIS, body) == stored and n > 1:
                why = "it was the first record of a chain: records before it were inserted"
            else:
                why = ("its content or position changed: record "
                       f"{n} was edited, or a record at or before it was inserted, deleted or "
                       "moved")
            return Verdict(ok=False, records=n - 1, head=prev.hex(), bad_record=n,
                           problem=f"record {n} does not match the chain: {why}")
        heads.append(computed)
        prev = computed
    count = 0
    checkpoints = list(checkpoints)
    for cp in checkpoints:
        count += 1
        if public_key is None:
            return Verdict(ok=False, records=n, head=prev.hex(),
                           problem="checkpoints given but no public key to check their "
                                   "signatures (pass --public-key)")
        if cp.key_id != key_id(public_key) or not checkpoint_signed_by(cp, public_key):
            return Verdict(ok=False, records=n, head=prev.hex(),
                           problem=f"the checkpoint of size {cp.size} at {cp.time} is not "
                                   "validly signed by the given key")
        if cp.size > n:
            return Verdict(ok=False, records=n, head=prev.hex(), bad_record=n + 1,
                           problem=f"the log was truncated: the checkpoint signed at {cp.time} "
                                   f"covers {cp.size} records but the log has {n}; records "
                                   f"{n + 1}..{cp.size} are missing")
        if cp.size > 0 and heads[cp.size - 1].hex() != cp.head:
            return Verdict(ok=False, records=n, head=prev.hex(),
                           problem=f"the first {cp.size} records are not the ones signed at "
                                   f"{cp.time}: the chain was rewritten")
    newest = max((cp.size for cp in checkpoints), default=0)
    if signed_to_end and n > newest:
        return Verdict(ok=False, records=n, head=prev.hex(), bad_record=newest + 1,
                       checkpoints_checked=count,
                       problem=f"records {newest + 1}..{n} are covered by no signature: the "
                               "broker signs every batch it acknowledges, so they were appended "
                               "by someone else (or written just before a crash; the broker "
                               "then records audit.unsigned_tail when it starts)")
    return Verdict(ok=True, records=n, head=prev.hex(), checkpoints_checked=count)


#: The first record of every chain of a log kept in a database (one chain per broker
#: process): it names the size and head of every other chain it found, so a whole chain
#: deleted later (rows, head and checkpoints) is still missed by the chains that saw it.
CHAIN_OPENED = "audit.chain_opened"


def check_witnesses(first_records: dict[str, dict[str, Any]],
                    heads_at: dict[str, list[str]]) -> list[str]:
    """What the chains' opening records say that the chains no longer show.

    ``first_records``: each chain's first record (parsed); ``heads_at``: each chain's
    record hashes in order (hex). Returns one problem per chain seen by another but now
    missing or shorter, or with other records than were seen; empty when all agree.
    """
    problems = []
    for origin, first in sorted(first_records.items()):
        if first.get("type") != CHAIN_OPENED:
            continue
        seen = first.get("chains")
        if not isinstance(seen, dict):
            continue
        for other, at in sorted(seen.items()):
            if not isinstance(at, dict):
                continue
            size, head = int(at.get("size") or 0), str(at.get("head") or "")
            heads = heads_at.get(str(other))
            if heads is None:
                problems.append(f"chain {other} is missing: chain {origin} saw it with {size} "
                                "record(s) when it opened; it was deleted from the database")
            elif size > len(heads):
                problems.append(f"chain {other} was truncated: chain {origin} saw {size} "
                                f"record(s) when it opened, it now has {len(heads)}")
            elif size > 0 and heads[size - 1] != head:
                problems.append(f"chain {other} was rewritten: its first {size} record(s) are "
                                f"not the ones chain {origin} saw when it opened")
    return problems
