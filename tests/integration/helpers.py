"""Raw gRPC clients with chosen certificates, for the broker's identity tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DEFAULT_BROKER_DNS
from broker.core.spiffeid import SpiffeId
from broker.devspiffe import DevCA, IssuedX509


def pem_pair(svid: IssuedX509) -> tuple[bytes, bytes]:
    key = serialization.load_der_private_key(svid.key_der, None)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = x509.load_der_x509_certificate(svid.cert_der).public_bytes(
        serialization.Encoding.PEM)
    return key_pem, cert_pem


def svid(ca: DevCA, spiffe_id: str, *, ttl: timedelta = timedelta(minutes=10),
         now: datetime | None = None) -> IssuedX509:
    return ca.issue_x509(SpiffeId.parse(spiffe_id), now=now or datetime.now(UTC), ttl=ttl)


def stub(port: int, trust_ca: DevCA, client: IssuedX509 | None) -> pb_grpc.CredentialBrokerStub:
    if client is None:
        creds = grpc.ssl_channel_credentials(root_certificates=trust_ca.bundle_pem)
    else:
        key, cert = pem_pair(client)
        creds = grpc.ssl_channel_credentials(root_certificates=trust_ca.bundle_pem,
                                             private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                  options=[("grpc.ssl_target_name_override", DEFAULT_BROKER_DNS)])
    return pb_grpc.CredentialBrokerStub(channel)


def issue_request(action_class: str = "enrichment", **kw: object) -> pb.IssueCredentialRequest:
    return pb.IssueCredentialRequest(action_class=action_class, **kw)  # type: ignore[arg-type]


EVENT = pb.InitiatingEvent(source="splunk", id="NOTABLE-1", summary="beaconing")
