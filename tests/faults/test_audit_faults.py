"""The audit log fails under a running broker: issuance stops, health says so, and no live
token is left that the log does not name."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.grpc.server import BrokerServer
from sidecar.client import SidecarError
from tests.faults.conftest import Factory
from tests.faults.support import BrokerFiles, VaultView, audit_records, error_code, settle, until
from tests.integration.conftest import TRIAGE, Identity, start_sidecar
from tests.integration.helpers import issue_request, stub, svid

SERVING = health_pb2.HealthCheckResponse.SERVING


def _health(port: int) -> int:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="credbroker.v1.CredentialBroker"),
            timeout=5).status)
    finally:
        channel.close()


def _issue(server: BrokerServer, identity: Identity, target: str = "") -> pb.Credential:
    return stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
        issue_request(target=target, request_id=uuid.uuid4().hex), timeout=15).credential


@pytest.fixture
def small_fs(short_tmp: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own, so the log can fill its file system and nothing else."""
    mnt = Path(tempfile.mkdtemp(prefix="fs-", dir=short_tmp))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until its file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)


def test_full_audit_file_system_stops_issuance_and_leaves_nothing_untracked(
    make_broker: Factory, small_fs: Path, view: VaultView, identity: Identity,
    tracked: list[BrokerFiles]
) -> None:
    server = make_broker(audit_path=small_fs / "audit.log", health_listen="127.0.0.1:0")
    try:
        assert server.health is not None
        handed = [_issue(server, identity).credential_id]
        _fill(small_fs / "filler")
        refused: grpc.RpcError | None = None
        for i in range(40):  # the log's last page may take a few more records
            try:
                handed.append(_issue(server, identity, f"t-{i}").credential_id)
            except grpc.RpcError as exc:
                refused = exc
                break
        assert refused is not None, "the broker kept issuing with its audit log full"
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.code()
        assert error_code(refused) == "audit_unavailable"
        until(lambda: _health(server.health_port) != SERVING,
              "health to go NOT_SERVING with the audit log full")
        assert any("audit log" in p for p in server.health.problems), server.health.problems
        with pytest.raises(grpc.RpcError) as again:
            _issue(server, identity, "again")
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        # Every live token is in the registry and named in the log (a token minted whose
        # record would not fit was revoked at once).
        v = settle(view, tracked, handed)
        assert v.ok, str(v)

        (small_fs / "filler").unlink()  # room again: the broker serves again on its own
        until(lambda: _health(server.health_port) == SERVING,
              "health to come back once the file system has room")
        handed.append(_issue(server, identity, "after").credential_id)
        v = settle(view, tracked, handed)
        assert v.ok, str(v)
        types = [r["type"] for r in audit_records(small_fs / "audit.log")]
        assert types[-2:] == ["decision", "credential.minted"], types[-4:]
    finally:
        server.stop(grace=0)  # before the tmpfs is unmounted
        # Later invariant checks still read this broker's log: keep a copy off the tmpfs.
        copy = small_fs.parent / f"{small_fs.name}-audit.log"
        shutil.copyfile(small_fs / "audit.log", copy)
        mine = next(b for b in tracked if b.audit == small_fs / "audit.log")
        tracked[tracked.index(mine)] = BrokerFiles(registry=mine.registry, audit=copy)


def test_audit_file_deleted_under_the_broker(
    make_broker: Factory, view: VaultView, identity: Identity, tracked: list[BrokerFiles],
    short_tmp: Path
) -> None:
    server = make_broker(health_listen="127.0.0.1:0")
    assert server.health is not None and server.config.audit_path is not None
    audit = server.config.audit_path
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{server.port}",
                       short_tmp / f"sc-{uuid.uuid4().hex[:6]}.sock")
    try:
        handed = [sc.client.request_credential("enrichment", target="before")["credential_id"]]
        assert _health(server.health_port) == SERVING
        kept = audit.with_name("audit.kept")
        os.link(audit, kept)  # what was written stays readable for the invariant check
        audit.unlink()
        mine = next(b for b in tracked if b.audit == audit)
        tracked[tracked.index(mine)] = BrokerFiles(registry=mine.registry, audit=kept)

        until(lambda: _health(server.health_port) != SERVING,
              "health to go NOT_SERVING with the audit file deleted")
        assert any("audit log" in p and "deleted" in p for p in server.health.problems), \
            server.health.problems
        with pytest.raises(SidecarError) as err:
            sc.client.request_credential("enrichment", target="after")
        assert (err.value.status, err.value.code) == (503, "audit_unavailable")
        with pytest.raises(grpc.RpcError) as rpc:
            _issue(server, identity, "after-grpc")
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_code(rpc.value) == "audit_unavailable"
        assert not audit.exists(), "the broker wrote a new file nobody is watching"
        v = settle(view, tracked, handed)
        assert v.ok, str(v)
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
