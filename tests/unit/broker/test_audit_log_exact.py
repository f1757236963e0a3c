"""The file audit log, mechanism by mechanism: appending several records at once, the
roll-back and what it tells the operator, a tail that cannot be cut back, the health check
and its recovery, checkpoint files, the head checkpoint and the signing key.

Each test isolates what the broad tests of ``test_audit_log.py`` pass through without
looking (found by mutation testing, docs/mutation.md). Real files; a write fails for real:
the process's file size limit (``RLIMIT_FSIZE``: EFBIG, as a quota would), or the log is
a named pipe (writes pass, fsync and truncate fail).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from broker.adapters.audit import (
    AuditLog,
    load_or_create_signing_key,
    read_checkpoints,
    read_head,
    read_records,
)
from broker.core.auditchain import verify_chain
from broker.errors import AuditError, ConfigError

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@contextmanager
def no_growth(log: AuditLog, slack: int = 0) -> Iterator[None]:
    """Files may grow only ``slack`` bytes past the log's size meanwhile (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (log.path.stat().st_size + slack, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_several_records_appended_at_once_are_chained_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, clock=lambda: T0)
    assert log.append_many([]) == [] and log.size == 0
    first = log.append("broker.started")
    out = log.append_many([("freeze", {"freeze_id": "f1"}), ("freeze.enforced", {"n": 2})])
    log.close()
    records = list(read_records(path))
    assert [(a.seq, a.hash) for a in out] == [(r["seq"], r["hash"]) for r in records[1:]]
    assert [a.seq for a in [first, *out]] == [1, 2, 3]
    assert records[1:] == [
        {"type": "freeze", "time": "2026-11-28T12:00:00Z", "freeze_id": "f1", "seq": 2,
         "hash": out[0].hash},
        {"type": "freeze.enforced", "time": "2026-11-28T12:00:00Z", "n": 2, "seq": 3,
         "hash": out[1].hash}]
    with path.open("rb") as f:
        assert verify_chain(f).ok


def test_several_records_that_cannot_be_written_all_fail_and_none_is_kept(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="ok-1")
    with no_growth(log), pytest.raises(AuditError, match="not writable"):
        log.append_many([("a", {}), ("b", {})])
    assert log.size == 1
    log.append("decision", request_id="ok-2")
    log.close()
    assert [r.get("request_id") for r in read_records(path)] == ["ok-1", "ok-2"]


def test_a_refused_write_tells_the_operator_and_counts_the_records(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    refused: list[int] = []
    log = AuditLog(path, on_error=refused.append)
    with no_growth(log), caplog.at_level(logging.ERROR, logger="credbroker.audit"), \
            pytest.raises(AuditError) as err:
        log.append("decision", request_id="lost")
    assert str(err.value) == (f"the audit log {path} is not writable (File too large); the "
                              "request was not carried out")
    assert refused == [1]
    assert (f"AUDIT LOG NOT WRITABLE: {path}: File too large; 1 record(s) refused"
            in caplog.messages)
    log.close()


def test_a_queued_record_keeps_its_type(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, clock=lambda: T0)
    with no_growth(log):
        assert log.append_or_queue("credential.revoked", credential_id="c1") is None
    log.append("decision", request_id="r1")
    log.close()
    assert [{k: v for k, v in r.items() if k != "hash"} for r in read_records(path)] == [
        {"type": "credential.revoked", "time": "2026-11-28T12:00:00Z", "credential_id": "c1",
         "seq": 1},
        {"type": "decision", "time": "2026-11-28T12:00:00Z", "request_id": "r1", "seq": 2}]


def test_a_partly_written_batch_is_cut_back_to_the_last_good_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="ok-1")
    good = path.read_bytes()
    with no_growth(log, slack=10), pytest.raises(AuditError):
        log.append("decision", request_id="lost")  # 10 bytes reach the file, then EFBIG
    assert path.read_bytes() == good and log.size == 1
    log.append("decision", request_id="ok-2")
    log.close()
    assert [r.get("request_id") for r in read_records(path)] == ["ok-1", "ok-2"]
    with path.open("rb") as f:
        assert verify_chain(f).ok


def test_a_tail_that_cannot_be_cut_back_stops_every_later_write(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The log's file becomes a named pipe (its descriptor and its path): the write passes,
    fsync and the cut-back fail, so bytes of the failed batch may follow the last good
    record: nothing is written after them until a restart repairs the tail."""
    log = AuditLog(tmp_path / "audit.log")
    log.append("decision", request_id="ok-1")
    path = tmp_path / "audit.pipe"
    os.mkfifo(path)
    fifo = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # its own reader: writes never block
    saved = os.dup(log._fd)
    os.dup2(fifo, log._fd)
    log.path = path
    try:
        with caplog.at_level(logging.CRITICAL, logger="credbroker.audit"), \
                pytest.raises(AuditError):
            log.append("decision", request_id="lost")
    finally:
        os.dup2(saved, log._fd)
        os.close(saved)
        os.close(fifo)
        log.path = tmp_path / "audit.log"
    why = "could not cut a failed write back (Invalid argument)"
    assert (f"audit log {path}: {why}; no further records will be written until the broker "
            "restarts (start-up repairs the tail)") in caplog.messages
    with pytest.raises(AuditError) as later:  # the file is fine again: still refused
        log.append("decision", request_id="ok-2")
    assert str(later.value) == (f"the audit log {log.path} is not writable ({why}); the "
                                "request was not carried out")
    with pytest.raises(AuditError) as health:
        log.check_writable()
    assert str(health.value) == f"the audit log {log.path} is not writable ({why})"
    log.close()
    assert [r.get("request_id") for r in read_records(log.path)] == ["ok-1"]


def test_the_health_check_fails_after_a_refused_write_until_the_cause_is_gone(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.check_writable()
    with no_growth(log):
        with pytest.raises(AuditError):
            log.append("decision", request_id="lost")
        path.rename(tmp_path / "moved.log")
        path.write_bytes(b"")
        with pytest.raises(AuditError) as err:  # says the write's failure, not the symptom
            log.check_writable()
        assert str(err.value) == f"the audit log {path} is not writable (File too large)"
        path.unlink()
        (tmp_path / "moved.log").rename(path)
    log.check_writable()  # space again: recovered
    path.rename(tmp_path / "moved.log")
    path.write_bytes(b"")
    with pytest.raises(AuditError) as err:
        log.check_writable()
    assert str(err.value) == (f"the audit log {path} is not writable (the log file was "
                              "replaced under the running broker)")
    log.close()


def test_a_closed_log_says_so_and_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, signing_key=Ed25519PrivateKey.generate())
    log.close()
    with pytest.raises(AuditError) as err:
        log.check_writable()
    assert str(err.value) == f"the audit log {path} is closed"
    spare = os.open(os.devnull, os.O_RDONLY)  # takes the lowest free descriptor number
    try:
        log.close()  # nothing left to close: the spare descriptor stays open
        os.fstat(spare)
    finally:
        os.close(spare)


def test_checkpoint_lines_are_appended_sorted_and_readable_by_anyone(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    mirror = tmp_path / "mirror.checkpoints"
    log = AuditLog(path, signing_key=Ed25519PrivateKey.generate(), mirror_path=mirror)
    log.append("decision", request_id="r1")
    first = log.checkpoint()
    log.append("decision", request_id="r2")
    second = log.checkpoint()
    log.close()
    assert first is not None and second is not None
    for target in (tmp_path / "audit.log.checkpoints", mirror):
        assert target.read_text().splitlines() == [
            json.dumps(cp.to_json(), sort_keys=True) for cp in (first, second)]
        assert read_checkpoints(target) == [first, second]
        assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_a_checkpoint_that_cannot_be_written_says_where(tmp_path: Path) -> None:
    mirror = tmp_path / "gone" / "mirror.checkpoints"
    log = AuditLog(tmp_path / "audit.log", signing_key=Ed25519PrivateKey.generate(),
                   mirror_path=mirror)
    with pytest.raises(AuditError) as err:
        log.checkpoint()
    assert str(err.value) == (f"cannot write the audit checkpoint to {mirror}: No such file "
                              "or directory")
    log.close()


def test_unreadable_checkpoint_files_are_named_with_the_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.checkpoints"
    with pytest.raises(AuditError) as err:
        read_checkpoints(missing)
    assert str(err.value) == f"cannot read checkpoints {missing}: No such file or directory"
    log = AuditLog(tmp_path / "audit.log", signing_key=Ed25519PrivateKey.generate())
    log.checkpoint()
    log.close()
    target = tmp_path / "audit.log.checkpoints"
    target.write_text(target.read_text() + "\nnot json\n")
    with pytest.raises(AuditError) as err:
        read_checkpoints(target)
    assert str(err.value).startswith(f"{target}:3: not a checkpoint (")


def test_a_head_checkpoint_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dir.head").mkdir()
    with pytest.raises(AuditError) as err:
        read_head(tmp_path / "dir.head")
    assert str(err.value) == (f"cannot read the head checkpoint {tmp_path / 'dir.head'}: Is a "
                              "directory")
    junk = tmp_path / "junk.head"
    junk.write_text("{}")
    with pytest.raises(AuditError) as err:
        read_head(junk)
    assert str(err.value).startswith(f"{junk} is not a head checkpoint (")
    empty = tmp_path / "empty.head"
    empty.write_text("  \n")
    assert read_head(empty) is None and read_head(tmp_path / "none.head") is None


def test_the_signing_key_is_loaded_back_and_must_be_ed25519(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    with pytest.raises(ConfigError) as err:
        load_or_create_signing_key(missing, create=False)
    assert str(err.value) == (f"audit signing key {missing} does not exist; create one with "
                              "`openssl genpkey -algorithm ed25519 -out KEY`")
    made = load_or_create_signing_key(tmp_path / "k.pem", create=True)
    loaded = load_or_create_signing_key(tmp_path / "k.pem", create=False)
    raw = (Encoding.Raw, PublicFormat.Raw)
    assert loaded.public_key().public_bytes(*raw) == made.public_key().public_bytes(*raw)
    assert (tmp_path / "k.pub").read_bytes() == made.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    other = tmp_path / "ec.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(ConfigError) as err:
        load_or_create_signing_key(other, create=False)
    assert str(err.value) == f"audit signing key {other} is not an Ed25519 key"


def test_a_queued_record_stays_owed_until_a_write_succeeds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, clock=lambda: T0)
    with no_growth(log), caplog.at_level(logging.ERROR, logger="credbroker.audit"):
        assert log.append_or_queue("credential.revoked", credential_id="c1") is None
        record = {"type": "credential.revoked", "time": "2026-11-28T12:00:00Z",
                  "credential_id": "c1"}
        assert (f"AUDIT LOG NOT WRITABLE: credential.revoked record queued in memory until "
                f"the log accepts writes again: {json.dumps(record)} (the audit log {path} is "
                "not writable (File too large); the request was not carried out)"
                in caplog.messages)
        with pytest.raises(AuditError):  # the queued one fails again with it: still owed
            log.append("decision", request_id="lost")
    with caplog.at_level(logging.WARNING, logger="credbroker.audit"):
        log.append("decision", request_id="r2")
    assert "audit log: 1 queued record(s) written" in caplog.messages
    log.close()
    assert [(r["type"], r["seq"]) for r in read_records(path)] == [
        ("credential.revoked", 1), ("decision", 2)]


def test_an_unreadable_or_malformed_log_is_named_with_the_record(tmp_path: Path) -> None:
    missing = tmp_path / "none.log"
    with pytest.raises(AuditError) as err:
        list(read_records(missing))
    assert str(err.value) == f"cannot read the audit log {missing}: No such file or directory"
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="r1")
    log.close()
    with path.open("ab") as f:
        f.write(b"not a record\n")
    with pytest.raises(AuditError) as err:
        list(read_records(path))
    assert str(err.value) == f"{path}: record 2 is malformed; run `credbroker audit verify`"


def test_the_head_checkpoint_is_one_fixed_slot_signed_by_this_origin(tmp_path: Path) -> None:
    from broker.adapters.audit import head_path_of

    path = tmp_path / "audit.log"
    log = AuditLog(path, signing_key=Ed25519PrivateKey.generate(), clock=lambda: T0)
    log.append("decision", request_id="r1")
    log.append("decision", request_id="r2")
    head = read_head(head_path_of(path))
    assert head is not None
    assert (head.origin, head.size, head.head, head.time) == (
        "credbroker", 2, log.head, "2026-11-28T12:00:00Z")
    line = json.dumps(head.to_json(), sort_keys=True).encode()
    assert head_path_of(path).read_bytes() == line.ljust(511) + b"\n"  # 512 bytes, in place
    log.close()


def test_a_log_file_deleted_or_replaced_under_the_broker_refuses_appends(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="r1")
    path.rename(tmp_path / "moved.log")
    deleted = "the log file was deleted under the running broker"
    with pytest.raises(AuditError) as health:  # before any append fails
        log.check_writable()
    assert str(health.value) == f"the audit log {path} is not writable ({deleted})"
    with pytest.raises(AuditError) as err:
        log.append("decision", request_id="lost")
    assert str(err.value) == (f"the audit log {path} is not writable ({deleted}); the "
                              "request was not carried out")
    path.write_bytes(b"")
    with pytest.raises(AuditError) as err:
        log.append("decision", request_id="lost")
    assert str(err.value) == (f"the audit log {path} is not writable (the log file was "
                              "replaced under the running broker); the request was not "
                              "carried out")
    log.close()


def test_opening_a_log_cut_mid_record_says_where_it_is_cut(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="r1")
    log.close()
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b'{"hash":"00","record":{"half')
    with caplog.at_level(logging.WARNING, logger="credbroker.audit"):
        AuditLog(path).close()
    assert (f"audit log {path} ends in a partial record (a crash while writing); cutting it "
            f"off at byte {size}") in caplog.messages
    assert path.stat().st_size == size


def test_a_malformed_record_stops_the_broker_with_what_to_run(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("decision", request_id="r1")
    log.close()
    with path.open("ab") as f:
        f.write(b"not a record\n")
    with pytest.raises(AuditError) as err:
        AuditLog(path)
    assert str(err.value) == (f"audit log {path} record 2 is malformed; run `credbroker audit "
                              "verify` and investigate before starting the broker")


def test_records_no_signature_covers_are_counted_and_said_at_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from broker.adapters.audit import head_path_of

    path = tmp_path / "audit.log"
    key = Ed25519PrivateKey.generate()
    log = AuditLog(path, signing_key=key)
    for i in range(3):
        log.append("decision", request_id=f"r{i}")
    log.close()
    assert oct(head_path_of(path).stat().st_mode & 0o777) == "0o644"
    head_path_of(path).write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="credbroker.audit"):
        again = AuditLog(path, signing_key=key)
    assert again.unsigned_at_open == 3
    assert (f"audit head checkpoint {head_path_of(path)} is unreadable; it is rewritten with "
            "the next record") in caplog.messages
    assert (f"audit log {path}: the last 3 record(s) were never covered by a signature "
            "(written before a crash, or appended by someone else); the next signature covers "
            "them and the log records it") in caplog.messages
    again.append("decision", request_id="r3")
    again.close()
    assert AuditLog(path, signing_key=key).unsigned_at_open == 0


def test_a_head_checkpoint_covering_more_than_the_log_counts_nothing_unsigned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    key = Ed25519PrivateKey.generate()
    log = AuditLog(path, signing_key=key)
    log.append("decision", request_id="r1")
    log.append("decision", request_id="r2")
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0])  # the log lost its last record; the head still says 2
    with caplog.at_level(logging.WARNING, logger="credbroker.audit"):
        again = AuditLog(path, signing_key=key)
    assert again.unsigned_at_open == 0 and again.size == 1
    assert not any("never covered" in m for m in caplog.messages)
    again.close()


def test_a_head_checkpoint_that_cannot_be_opened_stops_the_broker(tmp_path: Path) -> None:
    from broker.adapters.audit import head_path_of

    path = tmp_path / "audit.log"
    head_path_of(path).mkdir(parents=True)
    with pytest.raises(AuditError) as err:
        AuditLog(path, signing_key=Ed25519PrivateKey.generate())
    assert str(err.value) == (f"cannot open the audit head checkpoint {head_path_of(path)}: "
                              "Is a directory")


def test_opening_creates_the_directories_and_says_what_fails(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "b" / "audit.log")
    assert log.unsigned_at_open == 0 and log.size == 0  # no key: nothing to count
    log.append("decision", request_id="r1")
    log.close()
    (tmp_path / "dir.log").mkdir()
    with pytest.raises(AuditError) as err:
        AuditLog(tmp_path / "dir.log")
    assert str(err.value) == (f"cannot open the audit log {tmp_path / 'dir.log'}: Is a "
                              "directory; the broker does not run without a writable audit log")
    path = tmp_path / "a" / "b" / "audit.log"
    path.write_bytes(path.read_bytes().replace(b'"r1"', b'"rX"'))
    with pytest.raises(AuditError) as err:
        AuditLog(path)
    assert str(err.value) == (f"audit log {path} fails verification at record 1; run "
                              "`credbroker audit verify` and investigate before starting the "
                              "broker")
