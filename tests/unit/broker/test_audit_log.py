"""The audit log adapter on real files: durability, recovery, group commit and failure."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.adapters.audit import (
    AuditLog,
    load_or_create_signing_key,
    read_checkpoints,
    read_records,
)
from broker.core.auditchain import verify_chain
from broker.errors import AuditError, ConfigError


def verify(path: Path) -> object:
    with path.open("rb") as f:
        return verify_chain(f)


def test_appends_are_chained_numbered_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    a = log.append("broker.started", spiffe_id="spiffe://example.org/b")
    b = log.append("decision", request_id="r1")
    assert (a.seq, b.seq) == (1, 2) and log.size == 2
    log.close()
    again = AuditLog(path)
    assert again.size == 2 and again.head == b.hash
    assert again.append("broker.stopped").seq == 3
    again.close()
    records = list(read_records(path))
    assert [r["type"] for r in records] == ["broker.started", "decision", "broker.stopped"]
    assert [r["seq"] for r in records] == [1, 2, 3] and all("time" in r for r in records)
    assert verify(path).ok  # type: ignore[attr-defined]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_concurrent_appends_share_fsyncs_and_stay_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(100):
            s = log.append("decision", request_id=f"{k}-{i}").seq
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert sorted(seqs) == list(range(1, 801))
    v = verify(path)
    assert v.ok and v.records == 800  # type: ignore[attr-defined]


def test_a_partial_last_line_from_a_crash_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="r1")
    log.close()
    with path.open("ab") as f:
        f.write(b'{"hash":"00","record":{"half')
    log = AuditLog(path)
    assert log.size == 1
    log.append("decision", request_id="r2")
    log.close()
    assert verify(path).ok  # type: ignore[attr-defined]


def test_a_tampered_log_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="r1")
    log.append("decision", request_id="r2")
    log.close()
    path.write_bytes(path.read_bytes().replace(b'"r1"', b'"rX"'))
    with pytest.raises(AuditError, match="fails verification at record 1"):
        AuditLog(path)


def test_unwritable_log_fails_the_append_and_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="ok-1")
    saved = os.dup(log._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)  # the same descriptor now writes to a full device: ENOSPC
    try:
        with pytest.raises(AuditError, match="not writable"):
            log.append("decision", request_id="lost")
        assert log.size == 1
        assert log.append_or_queue("credential.revoked", credential_id="c1") is None
    finally:
        os.dup2(saved, log._fd)
        os.close(saved)
        os.close(full)
    log.append("decision", request_id="ok-2")  # the queued revocation goes first
    log.close()
    records = list(read_records(path))
    assert [r.get("request_id") or r.get("credential_id") for r in records] == \
        ["ok-1", "c1", "ok-2"]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert verify(path).ok  # type: ignore[attr-defined]


def test_checkpoints_are_signed_and_mirrored(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k.pem", create=True)
    assert (tmp_path / "k.pub").exists()
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    mirror = tmp_path / "elsewhere.checkpoints"
    log = AuditLog(tmp_path / "audit.log", signing_key=key, mirror_path=mirror)
    log.append("decision", request_id="r1")
    cp = log.checkpoint()
    assert cp is not None and cp.size == 1
    log.close()
    assert read_checkpoints(tmp_path / "audit.log.checkpoints") == [cp] == read_checkpoints(mirror)
    assert AuditLog(tmp_path / "other.log").checkpoint() is None


def test_signing_key_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_or_create_signing_key(tmp_path / "none.pem", create=False)
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match="cannot load"):
        load_or_create_signing_key(tmp_path / "junk.pem", create=False)
    assert isinstance(load_or_create_signing_key(tmp_path / "new.pem", create=True),
                      Ed25519PrivateKey)


def test_unopenable_location(tmp_path: Path) -> None:
    (tmp_path / "dir.log").mkdir()
    with pytest.raises(AuditError, match="cannot open the audit log"):
        AuditLog(tmp_path / "dir.log")


def _forge(path: Path, record: dict[str, object]) -> None:
    """Append a record with a correct chain hash, as anyone who can write the file could."""
    from broker.core.auditchain import canonical, chain_hash, decode_line, encode_line

    last = path.read_bytes().splitlines(keepends=True)[-1]
    head, _ = decode_line(last)
    body = canonical(record)
    with path.open("ab") as f:
        f.write(encode_line(body, chain_hash(head, body)))


def test_every_acknowledged_batch_is_signed_so_a_forged_tail_is_caught(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from broker.adapters.audit import head_path_of, read_head
    from broker.cli.main import main

    path = tmp_path / "audit.log"
    key = load_or_create_signing_key(tmp_path / "audit.key", create=True)
    log = AuditLog(path, signing_key=key)
    for i in range(5):
        log.append("decision", request_id=f"r{i}")
    head = read_head(head_path_of(path))
    assert head is not None and head.size == 5 and head.head == log.head  # no window
    log.close()
    pub = str(tmp_path / "audit.pub")
    assert main(["audit", "verify", str(path), "--public-key", pub]) == 0
    assert "intact, 5 records" in capsys.readouterr().out
    _forge(path, {"type": "credential.revoked", "seq": 6, "time": "2026-01-01T00:00:00Z"})
    with path.open("rb") as f:
        assert verify_chain(f).ok  # the chain alone cannot tell
    assert main(["audit", "verify", str(path), "--public-key", pub]) == 1
    assert "records 6..6 are covered by no signature" in capsys.readouterr().err
    # The broker, reopening it, says so and signs over it only on the record.
    again = AuditLog(path, signing_key=key)
    assert again.unsigned_at_open == 1
    again.close()


def test_a_head_signature_that_cannot_be_made_durable_fails_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, signing_key=Ed25519PrivateKey.generate())
    log.append("decision", request_id="r0")
    os.close(log._head_fd)  # the head file becomes unwritable under the log
    log._head_fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(AuditError, match="not writable"):
        log.append("decision", request_id="r1")
    log.close()
    assert [r["request_id"] for r in read_records(path)] == ["r0"]  # cut back: never acked
