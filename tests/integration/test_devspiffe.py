"""The dev Workload API served to py-spiffe's real clients, unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffe.svid.jwt_svid import JwtSvid

from broker._proto.spiffe.workload import workload_pb2 as wl
from broker.core.spiffeid import SpiffeId
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi
from tests.integration.conftest import BROKER, TRIAGE, Identity


@pytest.fixture
def fast_rotation(short_tmp: Path) -> Iterator[tuple[DevWorkloadApi, str]]:
    api = DevWorkloadApi(DevCA("example.org", now=datetime.now(UTC)),
                         svid_ttl=timedelta(seconds=3))
    sock = str(short_tmp / "rot" / "triage.sock")
    api.add_workload(TRIAGE, sock)
    api.start()
    yield api, "unix:" + sock
    api.stop()


def test_x509_source_gets_svid_and_bundle(identity: Identity) -> None:
    src = X509Source(socket_path=identity.socket("triage"), timeout_in_seconds=5)
    try:
        ctx = src.get_x509_context()
        svid = ctx.default_svid
        assert str(svid.spiffe_id) == TRIAGE
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None and len(bundle.x509_authorities) == 1
        assert svid.leaf.not_valid_after_utc - datetime.now(UTC) <= timedelta(minutes=30)
    finally:
        src.close()


def test_broker_svid_carries_its_dns_name(identity: Identity) -> None:
    client = WorkloadApiClient(identity.socket("broker"))
    try:
        svid = client.fetch_x509_svid()
        san = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [DEFAULT_BROKER_DNS]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [BROKER]
        assert client.fetch_x509_bundles().bundles
    finally:
        client.close()


def test_rotation_is_pushed_before_expiry(fast_rotation: tuple[DevWorkloadApi, str]) -> None:
    _, sock = fast_rotation
    src = X509Source(socket_path=sock, timeout_in_seconds=5)
    try:
        first = src.get_x509_context().default_svid
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            current = src.get_x509_context().default_svid
            if current.leaf.serial_number != first.leaf.serial_number:
                assert current.leaf.not_valid_after_utc > first.leaf.not_valid_after_utc
                assert datetime.now(UTC) < first.leaf.not_valid_after_utc  # before expiry
                return
            time.sleep(0.1)
        pytest.fail("no rotated SVID was pushed within 6 s (TTL 3 s)")
    finally:
        src.close()


def test_jwt_svids_validate_with_the_bundle_and_exact_audience(identity: Identity) -> None:
    agent = JwtSource(socket_path=identity.socket("triage"), timeout_in_seconds=5)
    verifier = JwtSource(socket_path=identity.socket("broker"), timeout_in_seconds=5)
    try:
        token = agent.fetch_svid(audience={"credbroker"})
        assert str(token.spiffe_id) == TRIAGE
        bundle = verifier.get_bundle_for_trust_domain(token.spiffe_id.trust_domain)
        assert bundle is not None
        assert str(JwtSvid.parse_and_validate(token.token, bundle, {"credbroker"}).spiffe_id) \
            == TRIAGE
        with pytest.raises(Exception, match=r"(?i)audience"):
            JwtSvid.parse_and_validate(token.token, bundle, {"someone-else"})
    finally:
        agent.close()
        verifier.close()


def test_validate_jwt_svid_rpc(identity: Identity) -> None:
    client = WorkloadApiClient(identity.socket("broker"))
    try:
        token = identity.ca.issue_jwt(
            SpiffeId.parse(TRIAGE),
            ["credbroker"], now=datetime.now(UTC), ttl=timedelta(minutes=1))
        assert str(client.validate_jwt_svid(token, "credbroker").spiffe_id) == TRIAGE
        with pytest.raises(Exception):  # noqa: B017 - py-spiffe wraps the gRPC error
            client.validate_jwt_svid(token, "other")
    finally:
        client.close()


def test_calls_without_the_security_header_are_refused(identity: Identity) -> None:
    channel = grpc.insecure_channel(identity.socket("triage"))
    call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID",
                                request_serializer=wl.X509SVIDRequest.SerializeToString,
                                response_deserializer=wl.X509SVIDResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        next(iter(call(wl.X509SVIDRequest(), timeout=5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in err.value.details()
    ok = call(wl.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=5)
    assert next(iter(ok)).svids[0].spiffe_id == TRIAGE
    channel.close()


def test_client_channel_is_reused_until_the_svid_rotates(identity: Identity) -> None:
    from broker.wire.tls import RotatingChannel

    src = X509Source(socket_path=identity.socket("triage"), timeout_in_seconds=5)
    channel = RotatingChannel(src, "127.0.0.1:1", DEFAULT_BROKER_DNS)
    try:
        first = channel.get()
        assert channel.get() is first  # no rebuild (and no new TLS session) per call
        identity.api.rotate_now(SpiffeId.parse(TRIAGE))
        deadline = time.monotonic() + 5
        while channel.get() is first:
            assert time.monotonic() < deadline, "rotated SVID did not produce a new channel"
            time.sleep(0.05)
    finally:
        channel.close()
        src.close()
